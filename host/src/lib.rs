//! `host`: a WebAssembly-pluggable executor host for AI command-line clients.
//!
//! Layers, each depending only on those below it:
//! `cli` → `service` → `plugin` (wasm runtime) and `process` (subprocess executor), with
//! `config` (services.toml) beside them.

pub mod cli;
pub mod config;
pub mod dirs;
pub mod outcome;
pub mod plugin;
pub mod process;
pub mod service;
