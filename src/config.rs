//! Model configuration: the release config.json and the vision tower CLIP config.
