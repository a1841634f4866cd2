//! Prompt to ids: the release's `tokenizer_image_token`.
