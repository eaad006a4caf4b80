//! `host`: a WebAssembly-pluggable executor host for AI command-line clients.
//!
//! Layers, each depending only on those below it:
//! `cli` → `dispatch` (a request through the policies) → `retry`, `breaker`, `quota`
//! (policies) → `service` (one attempt: plugin + process) → `plugin` (wasm runtime),
//! `process` (subprocess executor, starting processes through `spawn`) and `state` (SQLite store); `config` (services.toml),
//! `outcome` (result types) and `clock` beside them.

pub mod breaker;
pub mod cli;
pub mod clock;
pub mod batch;
pub mod config;
pub mod dirs;
pub mod dispatch;
pub mod health;
pub mod outcome;
pub mod plugin;
pub mod process;
pub mod quota;
pub mod retry;
pub mod service;
pub mod spawn;
pub mod state;
pub mod ui;
pub mod report;
