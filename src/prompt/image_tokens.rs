//! Prompt to ids: the release's `tokenizer_image_token` (`arcana/mm_utils.py`) and its constants
//! (`arcana/constants.py`).
use crate::Result;

/// Label value the release's training ignores.
pub const IGNORE_INDEX: i64 = -100;
/// The id that stands for an image in the ids; the model replaces it with the image's features.
pub const IMAGE_TOKEN_INDEX: i64 = -200;
pub const DEFAULT_IMAGE_TOKEN: &str = "<image>";
pub const DEFAULT_IMAGE_PATCH_TOKEN: &str = "<im_patch>";
pub const DEFAULT_IM_START_TOKEN: &str = "<im_start>";
pub const DEFAULT_IM_END_TOKEN: &str = "<im_end>";
pub const IMAGE_PLACEHOLDER: &str = "<image-placeholder>";

/// What `tokenizer_image_token` needs from a tokenizer: `tokenizer(text).input_ids` of transformers,
/// i.e. the ids of `text` with the BOS the tokenizer adds, and that BOS id.
pub trait TextEncoder {
    fn encode_with_bos(&self, text: &str) -> Result<Vec<i64>>;
    fn bos_id(&self) -> i64;
}

/// The release's `tokenizer_image_token(prompt, tokenizer)`: each `<image>` becomes [`IMAGE_TOKEN_INDEX`].
pub fn tokenizer_image_token<E: TextEncoder + ?Sized>(prompt: &str, encoder: &E) -> Result<Vec<i64>> {
    let chunk_ids =
        prompt.split(DEFAULT_IMAGE_TOKEN).map(|chunk| encoder.encode_with_bos(chunk)).collect::<Result<Vec<_>>>()?;
    Ok(splice_image_chunks(&chunk_ids, encoder.bos_id(), IMAGE_TOKEN_INDEX))
}

/// Joins the ids of the `<image>`-separated chunks with one `image_token_index` between neighbours.
///
/// As in the release: when the first chunk starts with BOS, the result starts with one BOS and every
/// chunk (the first included) loses its first id, whatever that id is; otherwise chunks are kept whole.
pub fn splice_image_chunks(chunk_ids: &[Vec<i64>], bos_id: i64, image_token_index: i64) -> Vec<i64> {
    let starts_with_bos = chunk_ids.first().and_then(|c| c.first()) == Some(&bos_id);
    let skip = usize::from(starts_with_bos);
    let mut ids = Vec::with_capacity(chunk_ids.iter().map(Vec::len).sum::<usize>() + chunk_ids.len());
    if starts_with_bos {
        ids.push(bos_id);
    }
    for (k, chunk) in chunk_ids.iter().enumerate() {
        if k > 0 {
            ids.push(image_token_index);
        }
        ids.extend(chunk.iter().skip(skip));
    }
    ids
}

/// Positions of [`IMAGE_TOKEN_INDEX`] in `ids`, in order.
pub fn image_token_positions(ids: &[i64]) -> Vec<usize> {
    ids.iter().enumerate().filter(|(_, &id)| id == IMAGE_TOKEN_INDEX).map(|(i, _)| i).collect()
}
