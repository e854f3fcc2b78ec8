//! `alignx-trainer`: command-line entry point. Parsing and exit codes only; the work
//! lives in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use alignx_schemas::prompt::Templates;
use alignx_trainer::dataset::{self, DatasetConfig};
use alignx_trainer::device::{self, DeviceChoice};
use alignx_trainer::eval::{self, EvalConfig, EvalSetting};
use alignx_trainer::generate::{self, SamplingParams};
use alignx_trainer::init::{self, Preset};
use alignx_trainer::kafka::{self, KafkaSource, ServiceKafka};
use alignx_trainer::lora::LoraConfig;
use alignx_trainer::model_dir::{self, Dtype};
use alignx_trainer::model_store::{ModelStore, RedisPointer, VersionMeta};
use alignx_trainer::onnx::export::{self, ExportDtype, ExportOptions, KvLayout, Logits};
use alignx_trainer::prompt_cmd::{self, SettingArg};
use alignx_trainer::recipe::{self, TinyRecipe};
use alignx_trainer::retrain::{self, RetrainConfig};
use alignx_trainer::rl::{self, Algo, RewardKind, RlConfig};
use alignx_trainer::sft::{self, SftConfig};
use alignx_trainer::synth::{self, SynthConfig};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// Trains and exports the AlignXplore preference-inference model, and renders its
/// prompt protocol.
#[derive(Debug, Parser)]
#[command(name = "alignx-trainer", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print exactly the prompt the model sees for an input file, with no trailing newline.
    ///
    /// The input is JSON in the golden-vector format: {"bos_token": "...", "pairs":
    /// [{"prompt","chosen","rejected"}], "ugc": [{"prompt","comment"}], "texts": ["..."]}.
    /// Exit code 2 when the input is invalid, naming the field.
    Prompt {
        /// Prompt layout.
        #[arg(long, value_enum, default_value = "base")]
        setting: SettingArg,
        /// Input JSON file, or `-` for standard input.
        #[arg(long)]
        input: PathBuf,
        /// The user's previous summary (streaming only; default: none, rendered as
        /// "Not provided").
        #[arg(long)]
        past_summary: Option<String>,
        /// TOML file overriding prompt templates (any subset of fields).
        #[arg(long, env = "ALIGNX_TEMPLATES")]
        templates: Option<PathBuf>,
    },
    /// Create a new model directory: random Qwen2 weights and a byte-level BPE tokenizer
    /// trained on a text corpus (config.json, model.safetensors, tokenizer.json, …).
    Init(InitArgs),
    /// Continue a prompt with a model directory and print the continuation. The prompt
    /// is encoded as-is (no chat template).
    Generate(GenerateArgs),
    /// Export a model directory to ONNX (model.onnx + config/tokenizer/generation files),
    /// servable by alignx-consumer: by default in the HF Optimum decoder-with-past layout.
    ExportOnnx {
        /// Model directory (HF layout; ours or one saved by transformers).
        #[arg(long)]
        model: PathBuf,
        /// Output directory (replaced atomically).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "fp32")]
        dtype: ExportDtype,
        /// `all`: logits for every position (Hugging Face Optimum's layout); `last`: the
        /// last position only — all the consumer needs, and a faster prefill.
        #[arg(long, value_enum, default_value = "all")]
        logits: Logits,
        /// `optimum`: past in, past + new out (any ONNX runtime serves it); `shared`:
        /// ONNX Runtime's GroupQueryAttention updating fixed-capacity cache buffers in
        /// place — faster decoding in alignx-consumer, which is the only server for it.
        #[arg(long, value_enum, default_value = "optimum")]
        kv_cache: KvLayout,
    },
    /// Build RL records from what the consumer logged: each logged update (previous
    /// summary + window) with the user's next `pair` signal as ground truth, users split
    /// into train/holdout by a seeded hash. Writes rl_train.jsonl, rl_holdout.jsonl,
    /// streaming_rl_train.jsonl, streaming_rl_holdout.jsonl and dataset_stats.json;
    /// prints the stats.
    BuildDataset(BuildDatasetArgs),
    /// The periodic job: build the dataset from the inference log, GRPO from the version
    /// being served, ACC_jud of both on the holdout users, and promote the candidate (new
    /// version in the store, `current` symlink and `alignx:model:current` re-pointed)
    /// only if it is not worse. Prints a JSON report; outcome promoted, refused (with why),
    /// no_new_data (same data as last time) or busy (another run holds the store's lock).
    Retrain(Box<RetrainArgs>),
    /// Publish a model directory as a new version of a model store and serve it (the
    /// first version, or a manual promotion/rollback target). Prints the version id.
    Publish {
        #[command(flatten)]
        store: StoreArgs,
        /// Policy model directory (HF layout, e.g. an SFT output); copied into the store.
        #[arg(long)]
        policy: PathBuf,
    },
    /// Fold a LoRA adapter into its base model, writing a plain model directory.
    MergeLora {
        /// Base model directory.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Supervised fine-tuning on {prompt, response} records (JSON array or JSON Lines);
    /// loss on response tokens only. Prints a JSON summary on stdout.
    Sft(SftArgs),
    /// Reinforcement learning with the judge reward R_jud (or R_gen): sample a group of
    /// summaries per prompt, reward those that make the judge pick the user's real next
    /// choice, PPO-clip update (GRPO; `--algo ppo`: a value head and GAE). Writes the
    /// model (or adapter) to --out and one JSON line per step to OUT/rl_log.jsonl; prints
    /// a JSON summary on stdout.
    Grpo(GrpoArgs),
    /// Write a deterministic synthetic preference world: signal streams (signal.v1 JSONL),
    /// cold_start, rl_train, streaming_rl_train, judge training data, eval data and the
    /// users' latent preferences (users.jsonl), with train/holdout users split.
    Synth(SynthArgs),
    /// Build a model recipe end to end. `tiny`: synthetic world → tokenizer → judge SFT →
    /// policy SFT → ONNX export → ACC_jud report, cached by a hash of its settings.
    Recipe {
        #[command(subcommand)]
        recipe: RecipeCommand,
    },
    /// ACC_jud: generate summaries for eval users with a policy and score held-out pairs
    /// with a judge, next to the no-summary and true-preference baselines. JSON report.
    Eval(EvalArgs),
}

#[derive(Debug, Subcommand)]
enum RecipeCommand {
    /// The tiny recipe (≤ 10 minutes on two CPU cores).
    Tiny(TinyArgs),
}

#[derive(Debug, Args)]
struct TinyArgs {
    /// Output directory (default: the cache, $ALIGNX_CACHE/recipes/KEY). Reused when it
    /// holds a finished run.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the world, the weights and the data order.
    #[arg(long, default_value_t = TinyRecipe::default().seed)]
    seed: u64,
    /// Users in the synthetic world (20% held out for evaluation).
    #[arg(long, default_value_t = TinyRecipe::default().users)]
    users: usize,
    /// SFT steps of the policy on cold-start data.
    #[arg(long, default_value_t = TinyRecipe::default().policy_steps)]
    policy_steps: usize,
    /// SFT steps of the judge's last curriculum stage (the real prompt); the three
    /// earlier stages get 1/2, 5/8 and 5/8 of it.
    #[arg(long, default_value_t = TinyRecipe::default().judge_steps)]
    judge_steps: usize,
    /// Print where the recipe is (or would be) cached and exit.
    #[arg(long)]
    print_dir: bool,
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Number of users (at least 2).
    #[arg(long)]
    users: usize,
    /// The same seed writes the same files, byte for byte.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created; its files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Share of observed pairs with chosen and rejected swapped.
    #[arg(long, default_value_t = SynthConfig::default().noise)]
    noise: f64,
    /// Share of users whose preferences change mid-stream.
    #[arg(long, default_value_t = SynthConfig::default().shift_rate)]
    shift_rate: f64,
    /// Share of users held out for evaluation.
    #[arg(long, default_value_t = SynthConfig::default().holdout)]
    holdout: f64,
    /// Signals in each user's stream (prompt windows are 4 signals).
    #[arg(long, default_value_t = SynthConfig::default().signals_per_user)]
    signals_per_user: usize,
    /// Styles to use, comma-separated, from: humor, concise, detailed, formal, examples,
    /// empathy, technical, optimism (default: all).
    #[arg(long, value_delimiter = ',')]
    styles: Vec<String>,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Policy model directory (omit: baselines only).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// A second policy, scored on the same items: its paired difference from --policy
    /// (ACC_jud points, standard error, items each got right alone).
    #[arg(long, requires = "policy")]
    compare: Option<PathBuf>,
    /// Judge model directory.
    #[arg(long)]
    judge: PathBuf,
    /// Eval records (AlignX eval layout; JSON array or JSON Lines).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "streaming")]
    setting: EvalSetting,
    /// Pairs per prompt window.
    #[arg(long, default_value_t = 4)]
    window: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
}

#[derive(Debug, Args)]
struct SftArgs {
    /// Model directory to start from.
    #[arg(long)]
    model: PathBuf,
    /// Training records: [{"prompt": …, "response": …}] or one per line.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: the final model, and checkpoint-STEP directories.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Forward passes per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// The cosine schedule ends at lr × this.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Longer examples (prompt + response + EOS, in tokens) are dropped and counted.
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// Write OUT/checkpoint-STEP every this many steps (0: never).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/checkpoint-STEP of a run with the same settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Weight precision while training (bf16/fp16 keep f32 master weights).
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: Dtype,
    #[command(flatten)]
    lora: LoraArgs,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
}

/// `--lora-rank/--lora-alpha/--lora-targets`, shared by the training commands.
#[derive(Debug, Args)]
struct LoraArgs {
    /// Train a LoRA adapter of this rank instead of all weights (output: a PEFT adapter).
    #[arg(long)]
    lora_rank: Option<i64>,
    /// LoRA scaling numerator (default: 2 × rank).
    #[arg(long, requires = "lora_rank")]
    lora_alpha: Option<f64>,
    /// Projections to adapt: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o", requires = "lora_rank")]
    lora_targets: String,
}

impl LoraArgs {
    /// The adapter asked for, if any.
    fn config(&self) -> anyhow::Result<Option<LoraConfig>> {
        match self.lora_rank {
            None => Ok(None),
            Some(rank) if rank <= 0 => anyhow::bail!("--lora-rank must be positive"),
            Some(rank) => Ok(Some(LoraConfig {
                rank,
                lora_alpha: self.lora_alpha.unwrap_or(2.0 * rank as f64),
                target_modules: LoraConfig::parse_targets(&self.lora_targets).map_err(anyhow::Error::msg)?,
            })),
        }
    }
}

#[derive(Debug, Args)]
struct GrpoArgs {
    /// Policy model directory to start from (an SFT policy); also the KL reference.
    #[arg(long)]
    policy: PathBuf,
    /// Judge model directory (scores A vs B by next-token log-probabilities); with
    /// `--reward gen`, the generator model whose log-probabilities R_gen compares.
    #[arg(long, visible_alias = "generator")]
    judge: PathBuf,
    /// `jud`: the judge picks the user's choice reading the summary; `gen`: the summary
    /// raises the generator's log-prob margin of chosen over rejected by more than τ.
    #[arg(long, value_enum, default_value = "jud")]
    reward: RewardKind,
    /// R_gen's margin τ (log-probability units).
    #[arg(long, default_value_t = alignx_trainer::rgen::DEFAULT_MARGIN)]
    margin: f64,
    /// `rl_train` records (base setting) or `streaming_rl_train` records (streaming),
    /// JSON array or JSON Lines.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: the final model, checkpoint-STEP directories, rl_log.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// `base`: one prompt per record. `streaming`: two consecutive steps of a user's
    /// history, the summary sampled for the first put into the second's prompt.
    #[arg(long, value_enum, default_value = "base")]
    setting: EvalSetting,
    #[command(flatten)]
    rl: RlArgs,
    /// Write OUT/checkpoint-STEP every this many steps (0: never).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Continue from OUT/checkpoint-STEP of a run with the same settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    lora: LoraArgs,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
}

/// The RL hyperparameters `grpo` and `retrain` share.
#[derive(Debug, Args)]
struct RlArgs {
    #[arg(long, default_value_t = RlConfig::default().steps)]
    steps: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = RlConfig::default().prompts_per_step)]
    prompts_per_step: usize,
    /// Samples per prompt (the group whose mean reward is the baseline).
    #[arg(long, default_value_t = RlConfig::default().group_size)]
    group_size: usize,
    #[arg(long, default_value_t = RlConfig::default().temperature)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = RlConfig::default().max_new_tokens)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = RlConfig::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// The cosine schedule ends at lr × this.
    #[arg(long, default_value_t = RlConfig::default().min_lr_ratio)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = RlConfig::default().max_grad_norm)]
    max_grad_norm: f64,
    /// Sequences per forward/backward pass.
    #[arg(long, default_value_t = RlConfig::default().micro_batch)]
    micro_batch: usize,
    /// PPO clip range ε.
    #[arg(long, default_value_t = RlConfig::default().clip)]
    clip: f64,
    /// Weight of the k3 KL penalty to the starting policy (0: none, no reference loaded).
    #[arg(long, default_value_t = 0.0)]
    kl_coef: f64,
    /// Keep advantages as reward − group mean, not divided by the group's std.
    #[arg(long)]
    no_std_normalize: bool,
    /// `hard`: 1 when the judge picks the user's choice (R_gen: the margin exceeds τ),
    /// else 0; `soft`: the judge's probability of the user's choice (R_gen: σ(margin − τ)).
    #[arg(long, value_enum, default_value = "hard")]
    reward_mode: RewardMode,
    /// Optimizer updates per batch of rollouts.
    #[arg(long, default_value_t = 1)]
    ppo_epochs: usize,
    /// `grpo`: advantages relative to the group's mean reward; `ppo`: a value head on the
    /// policy's hidden states (trained alongside, saved with checkpoints) and GAE.
    #[arg(long, value_enum, default_value = "grpo")]
    algo: Algo,
    /// PPO: GAE's λ (γ is 1).
    #[arg(long, default_value_t = RlConfig::default().gae_lambda)]
    gae_lambda: f64,
    /// PPO: weight of the value loss.
    #[arg(long, default_value_t = RlConfig::default().value_coef)]
    value_coef: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl RlArgs {
    /// `base` with these hyperparameters.
    fn config(&self, base: RlConfig) -> RlConfig {
        RlConfig {
            steps: self.steps,
            prompts_per_step: self.prompts_per_step,
            group_size: self.group_size,
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            min_lr_ratio: self.min_lr_ratio,
            max_grad_norm: self.max_grad_norm,
            micro_batch: self.micro_batch,
            clip: self.clip,
            kl_coef: self.kl_coef,
            std_normalize: !self.no_std_normalize,
            soft_reward: matches!(self.reward_mode, RewardMode::Soft),
            ppo_epochs: self.ppo_epochs,
            algo: self.algo,
            gae_lambda: self.gae_lambda,
            value_coef: self.value_coef,
            seed: self.seed,
            ..base
        }
    }
}

/// Where the inference log and the signals are read from: JSONL dumps, or the topics.
#[derive(Debug, Args)]
struct DataSourceArgs {
    /// JSONL dump of the inference-log topic (one record per line). With
    /// --signals-jsonl, instead of Kafka (any --brokers or ALIGNX_BROKERS is then unused:
    /// the chart's pods set it).
    #[arg(long, requires = "signals_jsonl")]
    log_jsonl: Option<PathBuf>,
    /// JSONL dump of signals: `{partition, offset, signal}` per line, or bare
    /// alignx.signal.v1 objects in stream order.
    #[arg(long, requires = "log_jsonl")]
    signals_jsonl: Option<PathBuf>,
    /// The service's configuration file (the consumer's TOML, which the Helm chart mounts
    /// into this job too): its `[kafka]` brokers, input_topic, log_topic, settings and
    /// settings_files are the defaults of the flags below.
    #[arg(long, env = "ALIGNX_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers: both topics are read whole, up to their ends at start.
    #[arg(long, env = "ALIGNX_BROKERS")]
    brokers: Option<String>,
    /// Inference-log topic [default: the config file's, else alignx.inference-log].
    #[arg(long)]
    log_topic: Option<String>,
    /// Signals topic [default: the config file's input_topic, else alignx.signals].
    #[arg(long)]
    signals_topic: Option<String>,
    /// Consumer group of the reader (offsets are never committed).
    #[arg(long, default_value = "alignx-trainer-dataset")]
    group: String,
    /// Extra librdkafka setting KEY=VALUE (repeatable): security.protocol, sasl.*, ssl.*.
    /// Secrets belong in --kafka-setting-file: arguments are visible in `ps`.
    #[arg(long = "kafka-setting", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    kafka_settings: Vec<(String, String)>,
    /// librdkafka setting whose value is a file's content, e.g.
    /// `sasl.password=/run/secrets/kafka-password` (repeatable; trailing newlines dropped).
    #[arg(long = "kafka-setting-file", value_name = "KEY=PATH", value_parser = parse_key_value)]
    kafka_setting_files: Vec<(String, String)>,
    /// Seconds to wait for the broker (metadata, and between messages).
    #[arg(long, default_value_t = 30)]
    kafka_timeout_s: u64,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    Ok((k.trim().to_owned(), v.to_owned()))
}

impl DataSourceArgs {
    /// Dumps when given; else the topics, flags over the config file over defaults.
    fn source(&self) -> anyhow::Result<dataset::Source> {
        if let (Some(log), Some(signals)) = (&self.log_jsonl, &self.signals_jsonl) {
            return Ok(dataset::Source::Files { log: log.clone(), signals: signals.clone() });
        }
        let file = match &self.config {
            Some(path) => ServiceKafka::from_file(path)?,
            None => ServiceKafka::default(),
        };
        let Some(brokers) = self.brokers.clone().or(file.brokers) else {
            anyhow::bail!(
                "give --brokers (or a --config whose [kafka] has brokers) to read the topics, or --log-jsonl \
                 and --signals-jsonl (dumps)"
            )
        };
        // A key set by a flag replaces the file's, whichever way either gives it.
        let (mut values, mut files) = (file.settings, file.settings_files);
        for (k, v) in &self.kafka_settings {
            files.remove(k);
            values.insert(k.clone(), v.clone());
        }
        for (k, path) in &self.kafka_setting_files {
            values.remove(k);
            files.insert(k.clone(), PathBuf::from(path));
        }
        Ok(dataset::Source::Kafka {
            kafka: KafkaSource {
                brokers,
                group: self.group.clone(),
                settings: kafka::settings(values, files)?,
                timeout: std::time::Duration::from_secs(self.kafka_timeout_s.max(1)),
            },
            log_topic: (self.log_topic.clone().or(file.log_topic))
                .unwrap_or_else(|| alignx_schemas::keys::INFERENCE_LOG_TOPIC.to_owned()),
            signals_topic: (self.signals_topic.clone().or(file.input_topic))
                .unwrap_or_else(|| alignx_schemas::keys::SIGNALS_TOPIC.to_owned()),
        })
    }
}

/// How logged updates become records.
#[derive(Debug, Args)]
struct DatasetArgs {
    /// `streaming`: rl_train prompts carry the previous summary the consumer had (as it
    /// served them); `base`: the window alone.
    #[arg(long, value_enum, default_value = "streaming")]
    dataset_setting: EvalSetting,
    /// Share of users held out (a seeded hash of the user id: stable as the log grows).
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Seeds the split and each comparison's A/B order.
    #[arg(long, default_value_t = 0)]
    dataset_seed: u64,
    /// TOML file overriding prompt templates (the consumer's, if it overrides them).
    #[arg(long, env = "ALIGNX_TEMPLATES")]
    templates: Option<PathBuf>,
}

impl DatasetArgs {
    fn config(&self) -> anyhow::Result<DatasetConfig> {
        let templates = match &self.templates {
            Some(path) => Templates::from_file(path)?,
            None => Templates::default(),
        };
        Ok(DatasetConfig {
            setting: self.dataset_setting,
            holdout: self.holdout,
            seed: self.dataset_seed,
            templates,
        })
    }
}

#[derive(Debug, Args)]
struct BuildDatasetArgs {
    #[command(flatten)]
    source: DataSourceArgs,
    #[command(flatten)]
    dataset: DatasetArgs,
    /// Output directory (created; its files are replaced).
    #[arg(long)]
    out: PathBuf,
}

/// The model store and the pointers to its served version.
#[derive(Debug, Args)]
struct StoreArgs {
    /// Model store: versions/ (served ONNX directories), policies/ (their trainable
    /// weights) and the symlink to the served version.
    #[arg(long = "model-store", env = "ALIGNX_MODEL_STORE")]
    store: PathBuf,
    /// Name of the store's symlink to the served version (what the consumer's
    /// --model-dir points at).
    #[arg(long, default_value = alignx_trainer::model_store::CURRENT_LINK)]
    current_link: String,
    /// Redis URL: the served version is read from, and promotion also writes,
    /// `alignx:model:current` (which the consumer prefers to the symlink when set).
    #[arg(long = "redis-url", env = "ALIGNX_REDIS_URL")]
    redis: Option<String>,
    /// File holding the Redis password (kept out of URLs and arguments).
    #[arg(long, env = "ALIGNX_REDIS_PASSWORD_FILE")]
    redis_password_file: Option<PathBuf>,
}

impl StoreArgs {
    fn redis(&self) -> anyhow::Result<Option<RedisPointer>> {
        let Some(url) = &self.redis else { return Ok(None) };
        let password = match &self.redis_password_file {
            Some(path) => Some(
                alignx_schemas::secret_file::read(path)
                    .with_context(|| format!("Redis password file {}", path.display()))?,
            ),
            None => None,
        };
        Ok(Some(RedisPointer { url: url.clone(), password }))
    }

    fn open(&self) -> anyhow::Result<ModelStore> {
        Ok(ModelStore::open_with_link(&self.store, &self.current_link)?)
    }
}

#[derive(Debug, Args)]
struct RetrainArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Judge model directory (the reward and the promotion gate).
    #[arg(long, env = "ALIGNX_JUDGE")]
    judge: PathBuf,
    /// Pushgateway URL (http://host:port): alignx_trainer_* metrics of the run are pushed.
    #[arg(long, env = "ALIGNX_PUSHGATEWAY")]
    pushgateway: Option<String>,
    /// Promote when candidate ACC_jud ≥ current − this (a share: 0.02 = 2 points; a
    /// negative value demands a gain).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    tolerance: f64,
    #[command(flatten)]
    source: DataSourceArgs,
    #[command(flatten)]
    dataset: DatasetArgs,
    /// `base`: GRPO on each logged prompt state (rl_train.jsonl); `streaming`: two
    /// consecutive updates of a user, the first's sample in the second's prompt.
    #[arg(long, value_enum, default_value = "base")]
    rl_setting: EvalSetting,
    #[command(flatten)]
    rl: RlArgs,
    /// Summaries per forward pass in the holdout evaluation.
    #[arg(long, default_value_t = 32)]
    eval_batch: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RewardMode {
    Hard,
    Soft,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Directory to create.
    #[arg(long)]
    out: PathBuf,
    /// UTF-8 text to train the tokenizer on.
    #[arg(long)]
    corpus: PathBuf,
    /// Starting sizes; the flags below override single values.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    #[arg(long)]
    hidden_size: Option<i64>,
    #[arg(long)]
    intermediate_size: Option<i64>,
    #[arg(long)]
    layers: Option<i64>,
    #[arg(long)]
    heads: Option<i64>,
    #[arg(long)]
    kv_heads: Option<i64>,
    /// Target tokenizer vocabulary (the trained size may be smaller on a small corpus).
    #[arg(long)]
    vocab_size: Option<usize>,
    #[arg(long)]
    max_position_embeddings: Option<i64>,
    /// Give the output projection its own weights instead of tying it to the embeddings.
    #[arg(long)]
    untied: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// File holding the prompt text, or `-` for standard input.
    #[arg(long)]
    prompt_file: PathBuf,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Pick the most likely token each step (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop once the output ends with this text (repeatable); kept in the output.
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: Dtype,
}

fn run_init(a: InitArgs) -> anyhow::Result<()> {
    let mut shape = a.preset.shape();
    shape.hidden_size = a.hidden_size.unwrap_or(shape.hidden_size);
    shape.intermediate_size = a.intermediate_size.unwrap_or(shape.intermediate_size);
    shape.num_hidden_layers = a.layers.unwrap_or(shape.num_hidden_layers);
    shape.num_attention_heads = a.heads.unwrap_or(shape.num_attention_heads);
    shape.num_key_value_heads = a.kv_heads.unwrap_or(shape.num_key_value_heads);
    shape.vocab_size = a.vocab_size.unwrap_or(shape.vocab_size);
    shape.max_position_embeddings = a.max_position_embeddings.unwrap_or(shape.max_position_embeddings);
    shape.tie_word_embeddings &= !a.untied;
    let config = init::init(&a.corpus, &shape, a.seed, &a.out, a.force)?;
    eprintln!(
        "initialised {}: {} layers, hidden {}, vocab {}",
        a.out.display(),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size
    );
    Ok(())
}

fn run_sft(a: SftArgs) -> anyhow::Result<()> {
    let cfg = SftConfig {
        model: a.model,
        data: a.data,
        out: a.out,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup_steps: a.warmup_steps,
        min_lr_ratio: a.min_lr_ratio,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        max_length: a.max_length,
        save_every: a.save_every,
        seed: a.seed,
        resume: a.resume,
        device: device::resolve(a.device)?,
        dtype: a.dtype,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        lora: a.lora.config()?,
    };
    tch::manual_seed(cfg.seed as i64);
    let summary = sft::run(&cfg)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn run_grpo(a: GrpoArgs) -> anyhow::Result<()> {
    let base = RlConfig {
        setting: a.setting,
        reward: a.reward,
        margin: a.margin,
        save_every: a.save_every,
        resume: a.resume,
        device: device::resolve(a.device)?,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        lora: a.lora.config()?,
        ..RlConfig::new(a.policy, a.judge, a.data, a.out)
    };
    let cfg = a.rl.config(base);
    tch::manual_seed(cfg.seed as i64);
    let summary = rl::run(&cfg)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn run_export(model: &std::path::Path, out: &std::path::Path, options: &ExportOptions) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let report = export::export(model, out, options)?;
    if !report.missing.is_empty() {
        eprintln!(
            "warning: {} has no {}; copy them next to model.onnx before serving",
            model.display(),
            report.missing.join(", ")
        );
    }
    eprintln!(
        "exported {} → {} ({} nodes, {:.1} MB of weights{}, {:.2}s)",
        model.display(),
        out.join(export::MODEL_FILE).display(),
        report.nodes,
        report.weight_bytes as f64 / 1e6,
        if report.external { " in model.onnx_data" } else { "" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = device::resolve(a.device)?;
    let prompt = if a.prompt_file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the prompt from stdin")?
    } else {
        std::fs::read_to_string(&a.prompt_file)
            .with_context(|| format!("cannot read {}", a.prompt_file.display()))?
    };
    let loaded = model_dir::load(&a.model, device, a.dtype)?;
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: if a.greedy { 0.0 } else { a.temperature.unwrap_or(0.0) },
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let (text, finish) = generate::complete_text(&loaded, &prompt, &params, &a.stop, device)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("cannot write the output")?;
    eprintln!("\n[finished: {finish:?}]");
    Ok(())
}

fn run_build_dataset(a: BuildDatasetArgs) -> anyhow::Result<()> {
    let stats = dataset::run(&a.dataset.config()?, &a.source.source()?, &a.out)?.stats;
    warn_dataset(&stats);
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}

/// Says on stderr what was dropped, so a thin dataset is never a silent surprise.
fn warn_dataset(s: &dataset::DatasetStats) {
    if s.no_later_pair > 0 {
        eprintln!("warning: {} logged updates have no later pair signal (not used)", s.no_later_pair);
    }
    if s.prompt_mismatch > 0 {
        eprintln!(
            "warning: {} logged prompts differ from the prompts re-rendered with these templates \
             (pass the consumer's --templates)",
            s.prompt_mismatch
        );
    }
    if s.unreadable_messages > 0 {
        eprintln!(
            "warning: {} messages were neither valid signals nor log records (skipped)",
            s.unreadable_messages
        );
    }
    if s.rl_holdout == 0 {
        eprintln!("warning: no holdout records (raise --holdout or log more users)");
    }
}

fn run_retrain(a: RetrainArgs) -> anyhow::Result<()> {
    let device = device::resolve(a.device)?;
    let cfg = RetrainConfig {
        store: a.store.store.clone(),
        current_link: a.store.current_link.clone(),
        redis: a.store.redis()?,
        source: a.source.source()?,
        dataset: a.dataset.config()?,
        judge: a.judge,
        rl: a.rl.config(RlConfig {
            setting: a.rl_setting,
            device,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            ..RlConfig::default()
        }),
        tolerance: a.tolerance,
        eval_max_new_tokens: a.rl.max_new_tokens,
        eval_batch: a.eval_batch,
        pushgateway: a.pushgateway,
        export: ExportOptions::for_consumer(),
        device,
    };
    tch::manual_seed(cfg.rl.seed as i64);
    let report = retrain::run(&cfg)?;
    if let Some(stats) = &report.dataset {
        warn_dataset(stats);
    }
    eprintln!("retrain: {}: {}", report.outcome.as_str(), report.reason);
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn run_publish(args: &StoreArgs, policy: &std::path::Path) -> anyhow::Result<()> {
    let store = args.open()?;
    let redis = args.redis()?;
    let _lock = store.try_lock()?.context("another retrain or publish holds the model store's lock")?;
    let meta = VersionMeta::new(
        store.current(redis.as_ref()).ok().map(|v| v.id),
        None,
        serde_json::json!({"published_from": policy.display().to_string()}),
    );
    let version = store.publish(policy, false, meta, &ExportOptions::for_consumer())?;
    store.point(&version, redis.as_ref())?;
    eprintln!("published {} and serving it ({})", version.id, version.served.display());
    println!("{}", version.id);
    Ok(())
}

fn run_synth(a: SynthArgs) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        users: a.users,
        seed: a.seed,
        noise: a.noise,
        shift_rate: a.shift_rate,
        holdout: a.holdout,
        signals_per_user: a.signals_per_user,
        styles: a.styles,
        ..SynthConfig::default()
    };
    let summary = synth::generate(&cfg, &a.out)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn run_recipe(a: TinyArgs) -> anyhow::Result<()> {
    let r = TinyRecipe {
        seed: a.seed,
        users: a.users,
        policy_steps: a.policy_steps,
        judge_steps: a.judge_steps,
        ..TinyRecipe::default()
    };
    let out = a.out.unwrap_or_else(|| recipe::cache_dir(&r));
    if a.print_dir {
        println!("{}", out.display());
        return Ok(());
    }
    // Both cores: the recipe is the only work running.
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    tch::manual_seed(r.seed as i64);
    let dir = recipe::tiny(&r, &out, true)?;
    let report = std::fs::read_to_string(dir.join("report.json"))?;
    println!("{report}");
    eprintln!("recipe: {}", dir.display());
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let report = eval::run(&EvalConfig {
        policy: a.policy,
        compare: a.compare,
        judge: a.judge,
        data: a.data,
        setting: a.setting,
        window: a.window,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        device: device::resolve(a.device)?,
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Prompt { setting, input, past_summary, templates } => {
            match prompt_cmd::render(&input, setting, past_summary.as_deref(), templates.as_ref()) {
                Ok(prompt) => {
                    let mut out = std::io::stdout().lock();
                    if out.write_all(prompt.as_bytes()).and_then(|()| out.flush()).is_err() {
                        return ExitCode::from(1);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
                }
            }
        }
        Command::Init(args) => report(run_init(args)),
        Command::Generate(args) => report(run_generate(args)),
        Command::Sft(args) => report(run_sft(args)),
        Command::Synth(args) => report(run_synth(args)),
        Command::Grpo(args) => report(run_grpo(args)),
        Command::BuildDataset(args) => report(run_build_dataset(args)),
        Command::Retrain(args) => report(run_retrain(*args)),
        Command::Publish { store, policy } => report(run_publish(&store, &policy)),
        Command::Recipe { recipe: RecipeCommand::Tiny(args) } => report(run_recipe(args)),
        Command::Eval(args) => report(run_eval(args)),
        Command::ExportOnnx { model, out, dtype, logits, kv_cache } => {
            let options = ExportOptions { dtype, logits, kv_layout: kv_cache, force_external: false };
            report(run_export(&model, &out, &options))
        }
        Command::MergeLora { model, adapter, out } => {
            report(model_dir::merge_lora(&model, &adapter, &out).map_err(anyhow::Error::from))
        }
    }
}

/// One line on stderr for an error, with its causes.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks (unique names, valid defaults) over every command.
    #[test]
    fn the_cli_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
