//! What one request may ask of a worker, checked when the request is read, before any image is decoded
//! or any token generated. Each limit is a flag of `arcana-serve`; a refusal names the limit and its value.

use crate::generate::constraint::Constraint;

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

/// Bytes of a constraint (`--max-constraint-bytes`): a JSON schema as sent, a regex or a grammar. Compiling
/// it runs on the engine's thread under llguidance's own size and work limits; this bounds what a request
/// hands it. Real-world extraction schemas are a few kilobytes.
pub const DEFAULT_MAX_CONSTRAINT_BYTES: usize = 65_536;

/// Nesting depth of a JSON schema (`--max-schema-depth`): objects and arrays inside each other.
pub const DEFAULT_MAX_SCHEMA_DEPTH: usize = 32;

/// Alternatives reported with each token's log-probability (`--max-top-logprobs`): OpenAI allows 20.
pub const DEFAULT_MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_images_per_request: usize,
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
    pub max_constraint_bytes: usize,
    pub max_schema_depth: usize,
    pub max_top_logprobs: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_images_per_request: DEFAULT_MAX_IMAGES_PER_REQUEST,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_bytes: DEFAULT_MAX_STOP_BYTES,
            max_constraint_bytes: DEFAULT_MAX_CONSTRAINT_BYTES,
            max_schema_depth: DEFAULT_MAX_SCHEMA_DEPTH,
            max_top_logprobs: DEFAULT_MAX_TOP_LOGPROBS,
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

impl RequestLimits {
    /// A constraint's size (`bytes`: its text, or a schema as serialized) and a schema's depth.
    pub fn check_constraint(&self, constraint: &Constraint) -> Result<(), String> {
        let (bytes, depth) = match constraint {
            Constraint::JsonObject => (0, 0),
            Constraint::JsonSchema(schema) => (schema.to_string().len(), json_depth(schema)),
            Constraint::Regex(text) | Constraint::Lark(text) => (text.len(), 0),
        };
        let limit = self.max_constraint_bytes;
        if bytes > limit {
            return Err(format!(
                "the {} is {bytes} bytes long: the limit is {limit} bytes (--max-constraint-bytes)",
                constraint.kind()
            ));
        }
        let limit = self.max_schema_depth;
        if depth > limit {
            return Err(format!(
                "the JSON schema nests {depth} levels deep: the limit is {limit} levels (--max-schema-depth)"
            ));
        }
        Ok(())
    }

    /// How many alternatives a request asks for with each token.
    pub fn check_top_logprobs(&self, top: usize) -> Result<(), String> {
        let limit = self.max_top_logprobs;
        if top > limit {
            return Err(format!("top_logprobs is {top}: the limit is {limit} (--max-top-logprobs)"));
        }
        Ok(())
    }
}

/// Objects and arrays nested in `value` (a scalar is 0 deep), without recursion.
fn json_depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match value {
            serde_json::Value::Object(map) => Box::new(map.values()),
            serde_json::Value::Array(items) => Box::new(items.iter()),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        stack.extend(children.map(|child| (child, depth + 1)));
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_limit_and_its_value() {
        let limits = RequestLimits {
            max_images_per_request: 2,
            max_stop_strings: 1,
            max_stop_bytes: 3,
            max_constraint_bytes: 40,
            max_schema_depth: 2,
            max_top_logprobs: 5,
        };
        assert!(limits.check_images(2).is_ok());
        let images = limits.check_images(3).unwrap_err();
        assert!(images.contains("3 images") && images.contains("limit is 2") && images.contains("--max-images"));
        assert!(limits.check_stop(&["abc".into()]).is_ok());
        let count = limits.check_stop(&["a".into(), "b".into()]).unwrap_err();
        assert!(count.contains("2 stop strings") && count.contains("limit is 1"), "{count}");
        let long = limits.check_stop(&["abcd".into()]).unwrap_err();
        assert!(long.contains("4 bytes") && long.contains("limit is 3 bytes"), "{long}");
        let shallow = Constraint::JsonSchema(serde_json::json!({"type": "object", "properties": {}}));
        assert!(limits.check_constraint(&shallow).is_ok());
        let deep = Constraint::JsonSchema(serde_json::json!({"properties": {"a": {"type": "string"}}}));
        let deep = limits.check_constraint(&deep).unwrap_err();
        assert!(deep.contains("3 levels") && deep.contains("limit is 2") && deep.contains("--max-schema-depth"));
        let long = limits.check_constraint(&Constraint::Regex("a".repeat(41))).unwrap_err();
        assert!(long.contains("regex is 41 bytes") && long.contains("limit is 40 bytes"), "{long}");
        assert!(limits.check_top_logprobs(5).is_ok());
        let top = limits.check_top_logprobs(6).unwrap_err();
        assert!(top.contains("6") && top.contains("limit is 5") && top.contains("--max-top-logprobs"), "{top}");
    }
}
