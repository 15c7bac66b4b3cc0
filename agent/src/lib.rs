//! lumos-agent: hosts Lumos connectors on-prem and serves capability calls.
//!
//! The binary (`main.rs`) is a thin shell around this library so that tests run the real agent
//! in-process: [`app::RunningAgent::start`] then [`app::RunningAgent::run`]. See
//! `docs/ARCHITECTURE.md` for the map.
#![forbid(unsafe_code)]

/// The agent's allocator: mimalloc, not the system's. A call through the tunnel makes a few
/// dozen short-lived allocations on one worker thread and frees some on another; glibc's malloc
/// spent a fifth of the tunnel benchmark's CPU on them (BENCHMARKS.md, issue 5). Declared here,
/// not in `main.rs`, so that everything that runs the agent (the daemon, its plugin worker, and
/// the tests and benchmarks that run it in-process) runs on the allocator it ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod doctor;
pub mod error;
pub mod exec;
pub mod exit;
pub mod metrics;
pub mod native;
pub mod oauth;
pub mod output;
pub mod platform;
pub mod plugins;
#[cfg(test)]
mod readme;
pub mod reaper;
pub mod redact;
pub mod service;
pub mod state;
pub mod stderr_capture;
pub mod stop;
pub mod telemetry;
pub mod tenants;
pub mod tunnel;
#[cfg(windows)]
pub mod winservice;
