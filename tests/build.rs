//! Bakes libtorch's directory into our binaries' rpath, so `cargo run`, `cargo test`
//! and installed binaries find it without LD_LIBRARY_PATH. torch-sys reports the
//! directory it linked against as `DEP_TCH_LIBTORCH_LIB` (its `links = "tch"`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
