//! What one request may ask of a worker, checked when the request is read, before any image is decoded
//! or any token generated. Each limit is a flag of `arcana-serve`; a refusal names the limit and its value.

/// Pixels per image, decoded or padded to a square (`--max-image-pixels`): 6000x6000. A 24-megapixel
/// photo (6000x4000) passes and so does a 12-megapixel phone photo padded to its square (4032x4032); the
/// model sees 336x336 whatever comes in. At 3 bytes a pixel the largest square takes 108 MB (Pillow's
/// own limit, 89 million pixels, allows 268 MB per image, and a padded square is not checked there).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 36_000_000;

/// Images per request (`--max-images-per-request`). The release's model takes one image per conversation
/// turn, and each takes 640 of its 2048 context positions (576 patches, 64 ladder queries): 3 fit, a 4th
/// is refused by the context check (made from the ids, before any image is decoded). 4 keeps every request
/// the context allows, also for a model with a longer context, while bounding what one request makes the
/// worker read and hold (vLLM's `--limit-mm-per-prompt` does the same).
pub const DEFAULT_MAX_IMAGES_PER_REQUEST: usize = 4;

/// Stop strings per request (`--max-stop-strings`): OpenAI's API allows 4.
pub const DEFAULT_MAX_STOP_STRINGS: usize = 4;

/// Bytes per stop string (`--max-stop-length`): every new token scans the text held back for each stop
/// string, so their length bounds the work per token; the release's stop strings are a few bytes.
pub const DEFAULT_MAX_STOP_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_images_per_request: usize,
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_images_per_request: DEFAULT_MAX_IMAGES_PER_REQUEST,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_bytes: DEFAULT_MAX_STOP_BYTES,
        }
    }
}

impl RequestLimits {
    /// A request carrying `count` images.
    pub fn check_images(&self, count: usize) -> Result<(), String> {
        let limit = self.max_images_per_request;
        if count > limit {
            return Err(format!(
                "{count} images in one request: the limit is {limit} images per request (--max-images-per-request)"
            ));
        }
        Ok(())
    }

    /// A request's stop strings: how many, and the length of each.
    pub fn check_stop(&self, stop: &[String]) -> Result<(), String> {
        let limit = self.max_stop_strings;
        if stop.len() > limit {
            return Err(format!(
                "{} stop strings: the limit is {limit} stop strings per request (--max-stop-strings)",
                stop.len()
            ));
        }
        let limit = self.max_stop_bytes;
        if let Some((i, long)) = stop.iter().enumerate().find(|(_, s)| s.len() > limit) {
            return Err(format!(
                "stop string {} is {} bytes long: the limit is {limit} bytes per stop string (--max-stop-length)",
                i + 1,
                long.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_limit_and_its_value() {
        let limits = RequestLimits { max_images_per_request: 2, max_stop_strings: 1, max_stop_bytes: 3 };
        assert!(limits.check_images(2).is_ok());
        let images = limits.check_images(3).unwrap_err();
        assert!(images.contains("3 images") && images.contains("limit is 2") && images.contains("--max-images"));
        assert!(limits.check_stop(&["abc".into()]).is_ok());
        let count = limits.check_stop(&["a".into(), "b".into()]).unwrap_err();
        assert!(count.contains("2 stop strings") && count.contains("limit is 1"), "{count}");
        let long = limits.check_stop(&["abcd".into()]).unwrap_err();
        assert!(long.contains("4 bytes") && long.contains("limit is 3 bytes"), "{long}");
    }
}
