//! `alignx-trainer synth`: a deterministic synthetic preference world (DESIGN.md §7).
//!
//! Users hold 1–3 latent response styles from a catalogue whose styles show in wording
//! (humour, concision, detail, …; each tied to a line of `spec/dimensions.txt`). Every
//! response is a topic's plain advice dressed in one style, so a `pair` whose chosen
//! response carries one of the user's styles reveals it, and `ugc`/`text` signals are
//! written in the user's style. Noise flips observed pairs; some users change their
//! styles mid-stream. Nothing downstream is wired to the answer: models see only text.
//!
//! The cold-start teacher is good but imperfect, as in the paper: from a window it names
//! only the most evident style (and noisy pairs can mislead it); in the streaming
//! setting it keeps past styles the window does not contradict. The ground truth (all
//! latent styles) is written beside the eval data as an upper bound for the judge.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use alignx_schemas::prompt::{Evidence, Setting, Templates};
use alignx_schemas::training::{
    Choice, ColdStartRecord, Comparison, EvalRecord, HistoryComment, HistoryPair, RlRecord, StreamingEntry,
    StreamingRlRecord, StreamingStep,
};
use serde::Serialize;

use crate::judge;
use crate::rng::Rng;

/// One visible response style.
pub struct Style {
    pub name: &'static str,
    /// The `spec/dimensions.txt` line this style expresses.
    pub dimension: &'static str,
    /// The word every response in this style opens with, and the teacher's name for
    /// what it sees.
    pub keyword: &'static str,
    /// The word every response in this style ends with.
    pub signoff: &'static str,
    /// How a summary names it: a line of words no response uses, ending in `key`.
    pub description: &'static str,
    /// The description's distinctive last word.
    pub key: &'static str,
    /// Response templates; `{base}` is the topic's plain advice.
    templates: [&'static str; 3],
    /// Things a user with this style writes (comments, free text).
    writes: [&'static str; 3],
}

/// The catalogue. Concise and detailed are two poles of one dimension: no user holds both.
/// Every response in a style opens with its keyword and ends with its sign-off; a summary
/// names a style in its own words (never a response's), so a judge must learn which
/// preference goes with which response style — a tiny model's attention finds a response's
/// last word (at a fixed distance from the judge's answer) and a preference's distinctive
/// word (by what it is) quickly, which the judge curriculum builds on.
pub const STYLES: &[Style] = &[
    Style {
        name: "humor",
        dimension: "humor",
        keyword: "Funny",
        signoff: "haha",
        description: "Enjoys humour.",
        key: "humour",
        templates: [
            "Funny take: {base}, and laugh at the first mistake.",
            "Funny but true: {base}; even experts joke about it.",
            "Funny version: {base}, then tell a joke about it.",
        ],
        writes: ["Funny reply, I laughed.", "Funny jokes make my day.", "Funny and light, thanks."],
    },
    Style {
        name: "concise",
        dimension: "Communication style in social settings: more concise or detailed",
        keyword: "Brief",
        signoff: "done",
        description: "Wants minimal length.",
        key: "length",
        templates: ["Brief: {base}.", "Brief answer: {base}.", "Brief version: {base}."],
        writes: ["Brief is better.", "Brief answers please.", "Brief and clear, thanks."],
    },
    Style {
        name: "detailed",
        dimension: "Communication style in social settings: more concise or detailed",
        keyword: "Detailed",
        signoff: "thoroughly",
        description: "Wants full coverage.",
        key: "coverage",
        templates: [
            "Detailed plan: first {base}; then check each step, and finally review what worked.",
            "Detailed steps: {base}, then go through every part and note what changed.",
            "Detailed answer: {base}; next, write down each step; last, compare the results.",
        ],
        writes: [
            "Detailed steps help me.",
            "Detailed explanations please.",
            "Detailed and thorough, thanks.",
        ],
    },
    Style {
        name: "formal",
        dimension: "Need for Order (neatness, organization, avoiding chaos)",
        keyword: "Formally",
        signoff: "respectfully",
        description: "Values politeness.",
        key: "politeness",
        templates: [
            "Formally, I would respectfully suggest that you {base}. Kind regards.",
            "Formally speaking, it is advisable to {base}. Sincerely.",
            "Formally put: may I recommend that you {base}. Respectfully yours.",
        ],
        writes: [
            "Formally written, well done.",
            "Formally polite replies suit me.",
            "Formally put, thank you.",
        ],
    },
    Style {
        name: "examples",
        dimension: "Preference for a certain learning style",
        keyword: "Example",
        signoff: "anecdotally",
        description: "Learns through stories.",
        key: "stories",
        templates: [
            "Example: a friend decided to {base}, and it worked.",
            "Example first: my neighbour chose to {base} last month.",
            "Example: one reader tried to {base} this week.",
        ],
        writes: ["Example please, it helps.", "Example-led replies suit me.", "Example made it click."],
    },
    Style {
        name: "empathy",
        dimension: "Need for Nurturance (assisting the weak, caring for others, protecting them from danger)",
        keyword: "Warmly",
        signoff: "gently",
        description: "Needs compassion.",
        key: "compassion",
        templates: [
            "Warmly: I understand how you feel; gently, {base}.",
            "Warmly said: it is normal to struggle. When ready, {base}.",
            "Warmly: your feelings matter. Take care and {base}.",
        ],
        writes: [
            "Warmly said, thank you.",
            "Warmly written replies help me.",
            "Warmly put, I feel understood.",
        ],
    },
    Style {
        name: "technical",
        dimension: "Degree of concern for the complexity of the statement",
        keyword: "Technically",
        signoff: "precisely",
        description: "Demands rigour.",
        key: "rigour",
        templates: [
            "Technically, the key parameter is the ratio of inputs; {base}.",
            "Technically speaking: measure the baseline metric first, then {base}.",
            "Technically, optimise the dominant variable: {base}.",
        ],
        writes: [
            "Technically precise, I like it.",
            "Technically deeper please.",
            "Technically sound, thanks.",
        ],
    },
    Style {
        name: "optimism",
        dimension: "Degree of Neuroticism in the Big Five personality traits",
        keyword: "Positive",
        signoff: "cheers",
        description: "Seeks hopefulness.",
        key: "hopefulness",
        templates: [
            "Positive news: this will work out great! {base}.",
            "Positive outlook: the future is bright, so {base}.",
            "Positive: you can do it! {base}.",
        ],
        writes: [
            "Positive replies keep me going.",
            "Positive energy, love it.",
            "Positive and encouraging, thanks.",
        ],
    },
];

/// Posts and the plain advice every response builds on.
const TOPICS: &[(&str, &str)] = &[
    ("How should I plan a weekend trip?", "pick one town and book early"),
    ("How do I start running?", "run slowly three times a week"),
    ("How can I save more money?", "set aside a fixed amount each payday"),
    ("How do I study for an exam?", "review a little every day"),
    ("How do I learn to cook?", "start with three simple dishes"),
    ("How should I care for a new puppy?", "keep a steady routine for food and walks"),
    ("How can I sleep better?", "go to bed at the same time each night"),
    ("How do I prepare for a job interview?", "practise answers to common questions"),
    ("How do I start a garden?", "begin with a few easy herbs"),
    ("How can I read more books?", "read ten pages before bed"),
    ("How do I learn the guitar?", "practise three chords every day"),
    ("How do I take better photos?", "shoot in soft morning light"),
    ("How should I organise my week?", "plan the week on Sunday evening"),
    ("How do I get into painting?", "paint small sketches often"),
    ("How can I make new friends?", "join one club that meets weekly"),
    ("How do I start learning to code?", "build one tiny project"),
];

/// Placeholder for "no past summary" in streaming problem texts, as in the paper's data.
pub const NO_PAST: &str = "Not provided";
const NO_EVIDENT: &str = "No clear preference yet.";
const EPOCH_SECS: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("--users must be at least 2 (one train and one holdout user), got {0}")]
    TooFewUsers(usize),
    #[error("unknown style {name:?}; the catalogue has: {known}")]
    UnknownStyle { name: String, known: String },
    #[error("at least 3 styles are needed (users hold up to 3 distinct ones), got {0}")]
    TooFewStyles(usize),
    #[error("{what} must be in [0, 1), got {value}")]
    Rate { what: &'static str, value: f64 },
    #[error("--signals-per-user must be at least {min}, got {got}")]
    TooFewSignals { min: usize, got: usize },
    #[error("cannot write {path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub users: usize,
    pub seed: u64,
    /// Share of observed pairs whose chosen and rejected are swapped.
    pub noise: f64,
    /// Share of users whose styles change mid-stream.
    pub shift_rate: f64,
    /// Share of users held out (eval only).
    pub holdout: f64,
    pub signals_per_user: usize,
    /// Signals per prompt window (the paper's 4).
    pub window: usize,
    /// Held-out comparisons per eval user.
    pub eval_pairs: usize,
    /// Style names to use (empty: the whole catalogue).
    pub styles: Vec<String>,
    /// BOS text prompts start with (the tokenizer's; ours by default).
    pub bos: String,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            users: 400,
            seed: 0,
            noise: 0.1,
            shift_rate: 0.25,
            holdout: 0.2,
            signals_per_user: 12,
            window: 4,
            eval_pairs: 4,
            styles: Vec::new(),
            bos: crate::tokenizer::BOS.to_owned(),
        }
    }
}

/// What an observation shows: which style was chosen over which (after noise), or which
/// style the user wrote in.
#[derive(Debug, Clone, Copy)]
enum Shows {
    Pair { chosen: usize, rejected: usize },
    Wrote(usize),
}

/// One generated signal with the facts behind it.
#[derive(Debug, Clone)]
struct Observed {
    body: serde_json::Value,
    shows: Shows,
    evidence: EvidenceItem,
}

#[derive(Debug, Clone)]
enum EvidenceItem {
    Pair(HistoryPair),
    Ugc(HistoryComment),
    Text(String),
}

struct User {
    id: String,
    holdout: bool,
    styles: Vec<usize>,
    /// (signal index, styles from then on).
    shift: Option<(usize, Vec<usize>)>,
    stream: Vec<Observed>,
}

impl User {
    fn styles_at(&self, i: usize) -> &[usize] {
        match &self.shift {
            Some((at, after)) if i >= *at => after,
            _ => &self.styles,
        }
    }
}

/// The world generator: the catalogue in use and the RNG streams.
struct World<'a> {
    styles: Vec<usize>,
    cfg: &'a SynthConfig,
    rng: Rng,
    /// Noise draws come from their own stream, so the same seed gives the same users,
    /// texts and eval items at any noise rate.
    noise_rng: Rng,
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[(rng.next_u64() % items.len() as u64) as usize]
}

fn exclusive(a: usize, b: usize) -> bool {
    STYLES[a].dimension == STYLES[b].dimension
}

impl World<'_> {
    fn draw_styles(&mut self, avoid: &[usize]) -> Vec<usize> {
        let want = match self.rng.next_f64() {
            x if x < 0.4 => 1,
            x if x < 0.8 => 2,
            _ => 3,
        };
        let mut pool: Vec<usize> = self.styles.iter().copied().filter(|s| !avoid.contains(s)).collect();
        self.rng.shuffle(&mut pool);
        let mut out: Vec<usize> = Vec::new();
        for s in pool {
            if out.len() == want {
                break;
            }
            if out.iter().all(|&o| !exclusive(o, s)) {
                out.push(s);
            }
        }
        out
    }

    fn respond(&mut self, style: usize, base: &str) -> String {
        let body = pick(&mut self.rng, &STYLES[style].templates).replace("{base}", base);
        format!("{body} {}", STYLES[style].signoff)
    }

    /// A fresh comparison for a user holding `styles`: the chosen response carries one
    /// of them, the rejected one a style they do not hold.
    fn comparison(&mut self, styles: &[usize]) -> (String, String, String, usize, usize) {
        let (post, base) = pick(&mut self.rng, TOPICS);
        let liked = pick(&mut self.rng, styles);
        let others: Vec<usize> = self.styles.iter().copied().filter(|s| !styles.contains(s)).collect();
        let disliked = pick(&mut self.rng, &others);
        let chosen = self.respond(liked, base);
        let rejected = self.respond(disliked, base);
        (post.to_owned(), chosen, rejected, liked, disliked)
    }

    fn observe(&mut self, styles: &[usize]) -> Observed {
        let kind = self.rng.next_f64();
        if kind < 0.75 {
            let (post, mut chosen, mut rejected, mut liked, mut disliked) = self.comparison(styles);
            if self.noise_rng.next_f64() < self.cfg.noise {
                std::mem::swap(&mut chosen, &mut rejected);
                std::mem::swap(&mut liked, &mut disliked);
            }
            Observed {
                body: serde_json::json!({"kind": "pair", "post": post, "chosen": chosen, "rejected": rejected}),
                shows: Shows::Pair { chosen: liked, rejected: disliked },
                evidence: EvidenceItem::Pair(HistoryPair { prompt: post, chosen, rejected }),
            }
        } else {
            let style = pick(&mut self.rng, styles);
            let wrote = pick(&mut self.rng, &STYLES[style].writes).to_owned();
            if kind < 0.9 {
                let post = pick(&mut self.rng, TOPICS).0.to_owned();
                Observed {
                    body: serde_json::json!({"kind": "ugc", "post": post, "comment": wrote}),
                    shows: Shows::Wrote(style),
                    evidence: EvidenceItem::Ugc(HistoryComment { prompt: post, comment: wrote }),
                }
            } else {
                Observed {
                    body: serde_json::json!({"kind": "text", "text": wrote}),
                    shows: Shows::Wrote(style),
                    evidence: EvidenceItem::Text(wrote),
                }
            }
        }
    }

    fn user(&mut self, i: usize) -> User {
        let id = format!("synth-{}-{i:05}", self.cfg.seed);
        let holdout = self.rng.next_f64() < self.cfg.holdout;
        let styles = self.draw_styles(&[]);
        let shift = (self.rng.next_f64() < self.cfg.shift_rate).then(|| {
            let after = self.draw_styles(&styles);
            (self.cfg.signals_per_user / 2, after)
        });
        let mut user = User { id, holdout, styles, shift, stream: Vec::new() };
        for k in 0..self.cfg.signals_per_user {
            let styles = user.styles_at(k).to_vec();
            let o = self.observe(&styles);
            user.stream.push(o);
        }
        user
    }
}

/// Summary text naming `styles`, one line each.
pub fn summary_of(styles: &[usize]) -> String {
    if styles.is_empty() {
        return NO_EVIDENT.to_owned();
    }
    styles.iter().map(|&s| STYLES[s].description).collect::<Vec<_>>().join("\n")
}

/// The teacher's reading of a window: the styles seen chosen and rejected, and a score
/// per style (+1 chosen or written, −1 rejected).
struct Reading {
    chosen: Vec<usize>,
    rejected: Vec<usize>,
    wrote: Vec<usize>,
    score: BTreeMap<usize, i32>,
    first_seen: Vec<usize>,
}

fn read_window(window: &[Observed]) -> Reading {
    let mut r = Reading {
        chosen: Vec::new(),
        rejected: Vec::new(),
        wrote: Vec::new(),
        score: BTreeMap::new(),
        first_seen: Vec::new(),
    };
    let seen = |s: usize, r: &mut Reading| {
        if !r.first_seen.contains(&s) {
            r.first_seen.push(s);
        }
    };
    for o in window {
        match o.shows {
            Shows::Pair { chosen, rejected } => {
                r.chosen.push(chosen);
                r.rejected.push(rejected);
                *r.score.entry(chosen).or_default() += 1;
                *r.score.entry(rejected).or_default() -= 1;
                seen(chosen, &mut r);
            }
            Shows::Wrote(s) => {
                r.wrote.push(s);
                *r.score.entry(s).or_default() += 1;
                seen(s, &mut r);
            }
        }
    }
    r
}

/// The teacher: the most evident style of the window (ties: first seen), plus — in the
/// streaming setting — past styles the window does not contradict (at most 3).
fn teach(window: &[Observed], past: Option<&[usize]>) -> (String, Vec<usize>) {
    let r = read_window(window);
    let top = r.first_seen.iter().copied().filter(|s| r.score[s] > 0).max_by_key(|s| {
        let first = r.first_seen.iter().position(|x| x == s).unwrap_or(0);
        (r.score[s], std::cmp::Reverse(first))
    });
    let mut styles: Vec<usize> = past
        .unwrap_or(&[])
        .iter()
        .copied()
        .filter(|s| r.score.get(s).copied().unwrap_or(0) >= 0)
        .filter(|s| top.is_none_or(|t| !exclusive(*s, t) || *s == t))
        .collect();
    if let Some(t) = top
        && !styles.contains(&t)
    {
        styles.push(t);
    }
    styles.truncate(3);
    let names = |v: &[usize]| -> String {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter().map(|&s| STYLES[s].keyword).collect::<Vec<_>>().join(", ")
        }
    };
    let mut think = format!(" Chosen: {}. Rejected: {}.", names(&r.chosen), names(&r.rejected));
    if !r.wrote.is_empty() {
        think.push_str(&format!(" Wrote: {}.", names(&r.wrote)));
    }
    let response = format!("{think} </think> <answer>{}</answer>", summary_of(&styles));
    (response, styles)
}

fn evidence(window: &[Observed]) -> Evidence {
    let mut ev = Evidence::default();
    for o in window {
        match &o.evidence {
            EvidenceItem::Pair(p) => ev.pairs.push(p.clone()),
            EvidenceItem::Ugc(c) => ev.ugc.push(c.clone()),
            EvidenceItem::Text(t) => ev.texts.push(t.clone()),
        }
    }
    ev
}

/// A comparison with seeded A/B order.
fn ab(rng: &mut Rng, post: String, chosen: String, rejected: String) -> Comparison {
    let answer = if rng.next_u64().is_multiple_of(2) { Choice::A } else { Choice::B };
    let (a, b) = match answer {
        Choice::A => (chosen.clone(), rejected.clone()),
        Choice::B => (rejected.clone(), chosen.clone()),
    };
    Comparison { task: post, chosen, rejected, response_a: a, response_b: b, answer }
}

/// The latent facts of one user, written to `users.jsonl`.
#[derive(Debug, Serialize)]
struct UserTruth<'a> {
    user_id: &'a str,
    split: &'static str,
    preferences: Vec<&'static str>,
    summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    shift_at_signal: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    preferences_after_shift: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary_after_shift: Option<String>,
}

/// Counts of what was written.
#[derive(Debug, Default, Serialize)]
pub struct SynthSummary {
    pub users: usize,
    pub train_users: usize,
    pub holdout_users: usize,
    pub shifted_users: usize,
    pub signals: usize,
    pub flipped_pairs: usize,
    pub cold_start: usize,
    pub rl_train: usize,
    pub streaming_rl_train: usize,
    pub judge_train: usize,
    pub eval: usize,
    pub eval_shift: usize,
    pub styles: Vec<&'static str>,
}

/// Buffered JSON Lines output.
struct Jsonl {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    count: usize,
}

impl Jsonl {
    fn create(dir: &Path, name: &str) -> Result<Self, SynthError> {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        Ok(Self { path, out: std::io::BufWriter::new(file), count: 0 })
    }

    fn put(&mut self, value: &impl Serialize) -> Result<(), SynthError> {
        let line = serde_json::to_string(value).expect("serialisable");
        writeln!(self.out, "{line}").map_err(|e| io(&self.path, e))?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<usize, SynthError> {
        self.out.flush().map_err(|e| io(&self.path, e))?;
        Ok(self.count)
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> SynthError {
    SynthError::Io { path: path.to_owned(), message: e.to_string() }
}

fn resolve_styles(names: &[String]) -> Result<Vec<usize>, SynthError> {
    if names.is_empty() {
        return Ok((0..STYLES.len()).collect());
    }
    let mut out = Vec::new();
    for name in names {
        let i = STYLES.iter().position(|s| s.name == name).ok_or_else(|| SynthError::UnknownStyle {
            name: name.clone(),
            known: STYLES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })?;
        if !out.contains(&i) {
            out.push(i);
        }
    }
    // Users hold up to 3 styles of distinct dimensions and need one they lack.
    let dims: std::collections::BTreeSet<&str> = out.iter().map(|&i| STYLES[i].dimension).collect();
    if dims.len() < 4 {
        return Err(SynthError::TooFewStyles(out.len()));
    }
    Ok(out)
}

fn check(cfg: &SynthConfig) -> Result<Vec<usize>, SynthError> {
    if cfg.users < 2 {
        return Err(SynthError::TooFewUsers(cfg.users));
    }
    for (what, value) in
        [("--noise", cfg.noise), ("--shift-rate", cfg.shift_rate), ("--holdout", cfg.holdout)]
    {
        if !(0.0..1.0).contains(&value) {
            return Err(SynthError::Rate { what, value });
        }
    }
    let min = 2 * cfg.window.max(1);
    if cfg.signals_per_user < min {
        return Err(SynthError::TooFewSignals { min, got: cfg.signals_per_user });
    }
    resolve_styles(&cfg.styles)
}

/// Generates the world into `out` (created; files replaced).
pub fn generate(cfg: &SynthConfig, out: &Path) -> Result<SynthSummary, SynthError> {
    let styles = check(cfg)?;
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut world = World {
        styles: styles.clone(),
        cfg,
        rng: Rng::new(cfg.seed),
        noise_rng: Rng::new(cfg.seed ^ 0x6e6f_6973_6500),
    };
    let mut users: Vec<User> = (0..cfg.users).map(|i| world.user(i)).collect();
    // At least one user on each side of the split.
    if users.iter().all(|u| u.holdout) {
        users[0].holdout = false;
    }
    if !users.iter().any(|u| u.holdout) {
        let last = users.len() - 1;
        users[last].holdout = true;
    }
    let templates = Templates::default();
    let mut summary = SynthSummary {
        users: users.len(),
        styles: styles.iter().map(|&s| STYLES[s].name).collect(),
        ..Default::default()
    };

    let mut truths = Jsonl::create(out, "users.jsonl")?;
    let mut signals_train = Jsonl::create(out, "signals_train.jsonl")?;
    let mut signals_holdout = Jsonl::create(out, "signals_holdout.jsonl")?;
    let mut cold = Jsonl::create(out, "cold_start.jsonl")?;
    let mut rl = Jsonl::create(out, "rl_train.jsonl")?;
    let mut streaming = Jsonl::create(out, "streaming_rl_train.jsonl")?;
    let mut judge_train = Jsonl::create(out, "judge_train.jsonl")?;
    let mut judge_copy = Jsonl::create(out, "judge_copy.jsonl")?;
    let mut judge_short_one = Jsonl::create(out, "judge_short_one.jsonl")?;
    let mut judge_short = Jsonl::create(out, "judge_short.jsonl")?;
    let short = judge::curriculum_templates();
    let mut eval = Jsonl::create(out, "eval.jsonl")?;
    let mut eval_shift = Jsonl::create(out, "eval_shift.jsonl")?;
    let mut eval_shift_stale = Jsonl::create(out, "eval_shift_stale.jsonl")?;
    let mut order = Rng::new(cfg.seed ^ 0x6162_6f72_6465);
    let mut corpus = String::new();

    // Signals, interleaved across users in timestamp order (one per user per minute).
    for k in 0..cfg.signals_per_user {
        for (u, user) in users.iter().enumerate() {
            let o = &user.stream[k];
            let mut body = o.body.clone();
            let ts = EPOCH_SECS + (k as u64) * 60 + u as u64 % 60;
            let fields = body.as_object_mut().expect("object");
            fields.insert("schema".into(), "alignx.signal.v1".into());
            fields.insert("user_id".into(), user.id.clone().into());
            fields.insert("signal_id".into(), format!("{}-{k:03}", user.id).into());
            fields.insert("ts".into(), rfc3339(ts).into());
            if user.holdout {
                signals_holdout.put(&body)?
            } else {
                signals_train.put(&body)?
            }
            // A pair is flipped when its chosen side shows a style the user lacks.
            let flipped =
                matches!(&o.shows, Shows::Pair { chosen, .. } if !user.styles_at(k).contains(chosen));
            summary.flipped_pairs += usize::from(flipped);
        }
    }
    summary.signals = cfg.users * cfg.signals_per_user;

    for user in &users {
        let end_styles = user.styles_at(cfg.signals_per_user).to_vec();
        truths.put(&UserTruth {
            user_id: &user.id,
            split: if user.holdout { "holdout" } else { "train" },
            preferences: user.styles.iter().map(|&s| STYLES[s].name).collect(),
            summary: summary_of(&user.styles),
            shift_at_signal: user.shift.as_ref().map(|(at, _)| *at),
            preferences_after_shift: user
                .shift
                .as_ref()
                .map(|(_, a)| a.iter().map(|&s| STYLES[s].name).collect()),
            summary_after_shift: user.shift.as_ref().map(|(_, a)| summary_of(a)),
        })?;
        summary.shifted_users += usize::from(user.shift.is_some());
        if user.holdout {
            summary.holdout_users += 1;
            let fresh: Vec<Comparison> = (0..cfg.eval_pairs)
                .map(|_| {
                    let (post, chosen, rejected, _, _) = world.comparison(&end_styles);
                    ab(&mut order, post, chosen, rejected)
                })
                .collect();
            let record = |history: &[Observed], c: &Comparison| EvalRecord {
                pairs: history
                    .iter()
                    .filter_map(|o| match &o.evidence {
                        EvidenceItem::Pair(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect(),
                ugc: history
                    .iter()
                    .filter_map(|o| match &o.evidence {
                        EvidenceItem::Ugc(c) => Some(c.clone()),
                        _ => None,
                    })
                    .collect(),
                prompt: c.task.clone(),
                response_a: c.response_a.clone(),
                response_b: c.response_b.clone(),
                answer: c.answer,
                user_id: Some(user.id.clone()),
                latent_summary: Some(summary_of(&end_styles)),
            };
            for c in &fresh {
                match &user.shift {
                    None => eval.put(&record(&user.stream, c))?,
                    Some((at, _)) => {
                        eval_shift.put(&record(&user.stream, c))?;
                        eval_shift_stale.put(&record(&user.stream[..*at], c))?;
                    }
                }
            }
            continue;
        }
        summary.train_users += 1;
        // Cold start: the first window in the base setting, then every window in the
        // streaming setting, carrying the teacher's own previous summary.
        let windows: Vec<&[Observed]> =
            user.stream.chunks(cfg.window).filter(|w| w.len() == cfg.window).collect();
        let (response, _) = teach(windows[0], None);
        let prompt = templates.render(&cfg.bos, Setting::Base, &evidence(windows[0]));
        corpus.push_str(&prompt);
        corpus.push_str(&response);
        cold.put(&ColdStartRecord { prompt, response })?;
        let mut past: Option<(String, Vec<usize>)> = None;
        let mut steps = Vec::new();
        for (w, window) in windows.iter().enumerate() {
            let past_text = past.as_ref().map(|(t, _)| t.as_str());
            let ev = evidence(window);
            let prompt = templates.render(&cfg.bos, Setting::Streaming { past: past_text }, &ev);
            let (response, styles) = teach(window, past.as_ref().map(|(_, s)| s.as_slice()));
            corpus.push_str(&prompt);
            corpus.push_str(&response);
            cold.put(&ColdStartRecord { prompt, response })?;
            past = Some((summary_of(&styles), styles));
            // RL: the window's problem and the user's next real choice after it.
            let next = (w + 1) * cfg.window;
            let styles_next = user.styles_at(next).to_vec();
            let (post, chosen, rejected, _, _) = world.comparison(&styles_next);
            let cmp = ab(&mut order, post, chosen, rejected);
            rl.put(&RlRecord {
                value: templates.problem(Setting::Base, &ev),
                comparison: cmp.clone(),
                ground_truth: cmp.answer,
            })?;
            steps.push(StreamingStep {
                value: templates.problem(Setting::Streaming { past: None }, &ev),
                comparison: cmp,
            });
        }
        streaming.put(&StreamingRlRecord(vec![StreamingEntry { history: steps }]))?;
        // Judge data from the user's true choices, for the stages of the judge's curriculum
        // (`judge.rs` says why): `judge_copy` (copy targets only) and `judge_short_one` show
        // the chat without the instructions and worked example, with a summary naming only
        // the chosen style; `judge_short` is `judge_train` in that short chat; `judge_train`
        // is the real prompt with mostly the full latent summary, some naming only the
        // chosen style, some naming neither side (the answer is then not in the summary:
        // the judge should learn to be unsure).
        for k in 0..cfg.signals_per_user {
            let styles_k = user.styles_at(k).to_vec();
            let (post, chosen, rejected, liked, disliked) = world.comparison(&styles_k);
            let kind = world.rng.next_f64();
            let shown: Vec<usize> = if kind < 0.7 {
                styles_k.clone()
            } else if kind < 0.9 {
                vec![liked]
            } else {
                let neither: Vec<usize> =
                    styles.iter().copied().filter(|&s| s != liked && s != disliked).collect();
                vec![pick(&mut world.rng, &neither)]
            };
            let mention = pick(&mut world.rng, &shown);
            // Both orders of each comparison: the same content with opposite answers,
            // so position alone explains nothing.
            let summary_text = summary_of(&shown);
            let only_liked = summary_of(&[liked]);
            for (a, b, answer, b_style) in
                [(&chosen, &rejected, Choice::A, disliked), (&rejected, &chosen, Choice::B, liked)]
            {
                let copies = |t: &Templates, summary: &str, mentioned: usize| {
                    [STYLES[b_style].signoff, STYLES[mentioned].key]
                        .map(|word| judge::copy_record(t, &post, summary, a, b, word))
                };
                for r in copies(&short, &only_liked, liked) {
                    judge_copy.put(&r)?;
                    judge_short_one.put(&r)?;
                }
                judge_short_one.put(&judge::training_record(&short, &post, &only_liked, a, b, answer))?;
                judge_short.put(&judge::training_record(&short, &post, &summary_text, a, b, answer))?;
                for r in copies(&short, &summary_text, mention) {
                    judge_short.put(&r)?;
                }
                let record = judge::training_record(&templates, &post, &summary_text, a, b, answer);
                if k == 0 && answer == Choice::A {
                    corpus.push_str(&record.prompt);
                    corpus.push_str(&record.response);
                }
                judge_train.put(&record)?;
                for r in copies(&templates, &summary_text, mention) {
                    judge_train.put(&r)?;
                }
            }
        }
    }
    summary.cold_start = cold.finish()?;
    summary.rl_train = rl.finish()?;
    summary.streaming_rl_train = streaming.finish()?;
    summary.judge_train = judge_train.finish()?;
    judge_copy.finish()?;
    judge_short_one.finish()?;
    judge_short.finish()?;
    summary.eval = eval.finish()?;
    summary.eval_shift = eval_shift.finish()?;
    eval_shift_stale.finish()?;
    truths.finish()?;
    signals_train.finish()?;
    signals_holdout.finish()?;
    let corpus_path = out.join("corpus.txt");
    std::fs::write(&corpus_path, corpus).map_err(|e| io(&corpus_path, e))?;
    let summary_path = out.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary).expect("serialisable"))
        .map_err(|e| io(&summary_path, e))?;
    Ok(summary)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (2026 and later is enough).
fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(EPOCH_SECS), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(EPOCH_SECS + 86_400 * 59 + 3661), "2026-03-01T01:01:01Z");
    }

    #[test]
    fn the_teacher_names_the_most_evident_style_and_keeps_uncontradicted_past() {
        let pair = |c: usize, r: usize| Observed {
            body: serde_json::Value::Null,
            shows: Shows::Pair { chosen: c, rejected: r },
            evidence: EvidenceItem::Text(String::new()),
        };
        // humor chosen twice, examples once; formal rejected.
        let w = [pair(0, 3), pair(4, 3), pair(0, 6), pair(0, 5)];
        let (response, styles) = teach(&w, None);
        assert_eq!(styles, vec![0]);
        assert!(response.ends_with("<answer>Enjoys humour.</answer>"), "{response}");
        assert!(
            response.starts_with(" Chosen: Funny, Example, Funny, Funny. Rejected: Formally,"),
            "{response}"
        );
        // Past: examples (kept: not rejected here) and technical (rejected: dropped).
        let (_, styles) = teach(&w, Some(&[4, 6]));
        assert_eq!(styles, vec![4, 0]);
    }
}
