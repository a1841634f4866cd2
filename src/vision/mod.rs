//! Vision side: CLIP vision transformer, Query Ladder adapter and image preprocessing.
pub mod preprocess;
