//! lumos-agent: hosts Lumos connectors on-prem and serves capability calls.
//!
//! The binary (`main.rs`) is a thin shell around this library so that tests run the real agent
//! in-process: [`app::RunningAgent::start`] then [`app::RunningAgent::run`]. See
//! `docs/ARCHITECTURE.md` for the map.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
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
pub mod redact;
pub mod service;
pub mod state;
pub mod stop;
pub mod telemetry;
pub mod tenants;
pub mod tunnel;
#[cfg(windows)]
pub mod winservice;
