//! Vision side: CLIP vision transformer, Query Ladder adapter and image preprocessing.
pub mod clip;
pub mod decode;
mod jpeg;
pub mod preprocess;
pub mod qladder;
pub mod resample;
pub mod tower;

pub use tower::{VisionOutputs, VisionTower};
