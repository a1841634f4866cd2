//! Helpers shared by the integration tests.
#![allow(dead_code)]
mod files;
pub mod serve;

pub use files::*;
