//! Image preprocessing as the release does it (`mm_utils.process_images` + CLIPImageProcessor).
