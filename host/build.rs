//! Builds the plugin crates under plugins/ as wasm32-wasip2 components, so that the host
//! binary can embed the built-in ones and the tests can load the test plugins. A user never
//! builds plugins by hand.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Plugin crates to build: (package, artifact file stem).
const PLUGINS: &[(&str, &str)] = &[
    ("template-plugin", "template_plugin"),
    ("gemini-plugin", "gemini_plugin"),
    ("qwen-plugin", "qwen_plugin"),
    ("claude-plugin", "claude_plugin"),
    ("codex-plugin", "codex_plugin"),
    ("llm-plugin", "llm_plugin"),
    ("misbehave-plugin", "misbehave_plugin"),
    ("future-plugin", "future_plugin"),
    ("mistyped-plugin", "mistyped_plugin"),
];

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!("cargo:rerun-if-changed={}", root.join("plugins").display());
    println!("cargo:rerun-if-changed={}", root.join("Cargo.lock").display());

    ensure_target();

    // A separate target directory: the outer cargo holds the lock on its own.
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out_dir.ancestors().nth(4).map(|t| t.join("wasm-plugins")).unwrap_or_else(|| out_dir.join("wasm-plugins"));
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (package, _) in PLUGINS {
        // `cargo rustc` lets the crate stay an rlib for native unit tests while the wasm
        // build is a cdylib, which the wasm32-wasip2 target emits as a component.
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args(["rustc", "--lib", "--crate-type", "cdylib", "--profile", "plugin", "--target", TARGET, "-p", package])
            .arg("--target-dir")
            .arg(&target_dir)
            // A small stack keeps the instance's initial memory small, and every call starts
            // from a fresh instance whose memory the host must reset: 1 MiB (the default) costs
            // more to reset than the call itself.
            .args(["--", "-C", "link-arg=-zstack-size=131072"]);
        // Flags meant for the host build must not leak into the wasm build.
        for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"] {
            cmd.env_remove(var);
        }
        let status = cmd.status().expect("running cargo to build the wasm plugins");
        if !status.success() {
            panic!("building the wasm plugin {package} failed (see the cargo output above)");
        }
    }
    for (_, stem) in PLUGINS {
        let built = target_dir.join(TARGET).join("plugin").join(format!("{stem}.wasm"));
        let dest = out_dir.join(format!("{stem}.wasm"));
        let bytes = std::fs::read(&built).unwrap_or_else(|e| panic!("reading {}: {e}", built.display()));
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&dest, &bytes).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
        std::fs::write(out_dir.join(format!("{stem}.sha256")), digest).expect("writing the plugin digest");
    }
    println!("cargo:rustc-env=EXECHOST_PLUGIN_DIR={}", out_dir.display());
}

/// The wasm target must be installed; with rustup it is added on the spot.
fn ensure_target() {
    let sysroot = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let installed = |root: &str| Path::new(root).join("lib/rustlib").join(TARGET).exists();
    if sysroot.as_deref().is_some_and(installed) {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup (needed to build the plugins)");
    let ok = Command::new("rustup").args(["target", "add", TARGET]).status().is_ok_and(|s| s.success());
    if !ok {
        panic!("the {TARGET} Rust target is missing: run `rustup target add {TARGET}`");
    }
}
