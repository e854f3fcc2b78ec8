//! Bakes libtorch's directory into our binaries' rpath, so `cargo run`, `cargo test`
//! and installed binaries find it without LD_LIBRARY_PATH. torch-sys reports the
//! directory it linked against as `DEP_TCH_LIBTORCH_LIB` (its `links = "tch"`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    // Only set for packages that depend on torch-sys directly, hence that dependency.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB unset: this package must depend on torch-sys directly");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
