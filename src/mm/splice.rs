//! The release's `prepare_inputs_labels_for_multimodal` (`model/llava_arch.py`) at inference: every
//! [`IMAGE_TOKEN_INDEX`] becomes that image's projected features, text ids are embedded, rows are cut to
//! `tokenizer_model_max_length` and right-padded with zeros, and a new padding mask is built.
use crate::error::{Error, Result};
use crate::llm::LlamaModel;
use crate::prompt::image_tokens::IMAGE_TOKEN_INDEX;
use std::ops::Range;
use tch::{Kind, Tensor};

/// The language model's input after the splice.
pub struct Spliced {
    /// `[B, L, hidden]`, zero right padding.
    pub inputs_embeds: Tensor,
    /// `[B, L]` int64, 1 on real positions.
    pub attention_mask: Tensor,
    /// Real positions of each row.
    pub lengths: Vec<i64>,
    /// Positions holding image features, per row.
    pub image_spans: Vec<Vec<Range<i64>>>,
}

/// The rows of a right-padded `[B, T]` id tensor: `ids[b][mask[b] == 1]` (every id without a mask).
pub fn unpadded_rows(input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Vec<Vec<i64>>> {
    let s = input_ids.size();
    if s.len() != 2 {
        return Err(Error::InvalidInput(format!("input ids must be [batch, tokens], got {s:?}")));
    }
    let ids: Vec<i64> = Vec::<i64>::try_from(input_ids.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?;
    let keep: Vec<i64> = match attention_mask {
        Some(m) if m.size() != s => {
            return Err(Error::InvalidInput(format!("attention mask {:?} does not match input ids {s:?}", m.size())))
        }
        Some(m) => Vec::<i64>::try_from(m.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?,
        None => vec![1; ids.len()],
    };
    let t = s[1] as usize;
    Ok((0..s[0] as usize).map(|b| (0..t).filter(|&j| keep[b * t + j] != 0).map(|j| ids[b * t + j]).collect()).collect())
}

/// How many images a batch consumes: one per placeholder, and one per row without a placeholder (the
/// release takes, and drops, the next image's features for such a row).
pub fn image_slots(rows: &[Vec<i64>]) -> usize {
    rows.iter().map(|r| r.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count().max(1)).sum()
}

/// The positions [`prepare_inputs`] gives one row of ids whose placeholders each take an image's
/// `tokens_per_image` features: text tokens plus the features, cut to `max_tokens` as [`splice`] cuts.
/// Known from the ids alone, before any image is decoded or encoded.
pub fn spliced_length(ids: &[i64], tokens_per_image: i64, max_tokens: Option<i64>) -> i64 {
    let placeholders = ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count() as i64;
    let length = ids.len() as i64 + placeholders * (tokens_per_image - 1);
    match max_tokens {
        Some(max) if placeholders > 0 => length.min(max),
        _ => length,
    }
}

/// Right-pads rows of ids with `pad_id`: `([B, T] ids, [B, T] mask)`.
pub fn pad_rows(rows: &[Vec<i64>], pad_id: i64) -> Result<(Tensor, Tensor)> {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![pad_id; rows.len() * t];
    let mut mask = vec![0i64; rows.len() * t];
    for (b, r) in rows.iter().enumerate() {
        ids[b * t..b * t + r.len()].copy_from_slice(r);
        mask[b * t..b * t + r.len()].fill(1);
    }
    let shape = [rows.len() as i64, t as i64];
    Ok((Tensor::f_from_slice(&ids)?.f_reshape(shape)?, Tensor::f_from_slice(&mask)?.f_reshape(shape)?))
}

/// The release's inputs at generation: with images, [`splice`] of the unpadded rows; without, as the
/// release's `generate`, `embed_tokens(input_ids)` of the padded ids as they are, with the given mask.
pub fn prepare_inputs(
    model: &LlamaModel,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    image_features: Option<&Tensor>,
    max_tokens: Option<i64>,
) -> Result<Spliced> {
    let rows = unpadded_rows(input_ids, attention_mask)?;
    if image_features.is_some() {
        return splice(model, &rows, image_features, max_tokens);
    }
    if rows.iter().flatten().any(|&id| id == IMAGE_TOKEN_INDEX) {
        return Err(Error::InvalidInput("the prompt has image placeholders but no image was given".into()));
    }
    let s = input_ids.size();
    let mask = match attention_mask {
        Some(m) => m.f_to_kind(Kind::Int64)?,
        None => Tensor::f_ones([s[0], s[1]], (Kind::Int64, input_ids.device()))?,
    };
    Ok(Spliced {
        inputs_embeds: model.embed(input_ids)?,
        attention_mask: mask.f_to_device(model.embed_tokens.device())?,
        lengths: rows.iter().map(|r| r.len() as i64).collect(),
        image_spans: vec![Vec::new(); rows.len()],
    })
}

/// Splices `image_features` (`[N, tokens_per_image, hidden]`, in placeholder order) into `rows`.
/// Without features, no row may hold a placeholder and the rows are embedded as text.
pub fn splice(
    model: &LlamaModel,
    rows: &[Vec<i64>],
    image_features: Option<&Tensor>,
    max_tokens: Option<i64>,
) -> Result<Spliced> {
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(Error::InvalidInput("splice: an empty batch or an empty prompt".into()));
    }
    let hidden = model.embed_tokens.size()[1];
    let placeholders: usize = rows.iter().map(|r| r.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count()).sum();
    let features: Vec<Tensor> = match image_features {
        None if placeholders > 0 => {
            return Err(Error::InvalidInput(format!(
                "the prompt has {placeholders} image placeholder(s) but no image was given"
            )))
        }
        None => Vec::new(),
        Some(f) => {
            let fs = f.size();
            if fs.len() != 3 || fs[2] != hidden {
                return Err(Error::InvalidInput(format!("image features {fs:?}, expected [images, tokens, {hidden}]")));
            }
            let needed = image_slots(rows);
            if fs[0] as usize != needed {
                return Err(Error::InvalidInput(format!(
                    "{} image(s) given for {placeholders} placeholder(s) in {} row(s): the release needs {needed} \
                     (one per placeholder, one per row without a placeholder)",
                    fs[0],
                    rows.len()
                )));
            }
            (0..fs[0]).map(|i| f.f_get(i)).collect::<std::result::Result<_, _>>()?
        }
    };
    let mut next_image = 0usize;
    let mut row_embeds = Vec::with_capacity(rows.len());
    let mut image_spans = Vec::with_capacity(rows.len());
    for ids in rows {
        let text: Vec<i64> = ids.iter().copied().filter(|&id| id != IMAGE_TOKEN_INDEX).collect();
        let text_embeds = model.embed(&Tensor::f_from_slice(&text)?)?;
        let mut parts = Vec::new();
        let mut spans = Vec::new();
        let (mut pos, mut text_at) = (0i64, 0i64);
        for chunk in ids.split(|&id| id == IMAGE_TOKEN_INDEX).enumerate() {
            let (k, chunk) = chunk;
            if k > 0 {
                let feats = &features[next_image];
                next_image += 1;
                let n = feats.size()[0];
                spans.push(pos..pos + n);
                parts.push(feats.shallow_clone());
                pos += n;
            }
            let n = chunk.len() as i64;
            parts.push(text_embeds.f_narrow(0, text_at, n)?);
            text_at += n;
            pos += n;
        }
        if !features.is_empty() && spans.is_empty() {
            next_image += 1;
        }
        let mut embeds = Tensor::f_cat(&parts, 0)?;
        if let Some(max) = max_tokens {
            if pos > max {
                embeds = embeds.f_narrow(0, 0, max)?;
                spans = spans.into_iter().filter(|r| r.start < max).map(|r| r.start..r.end.min(max)).collect();
            }
        }
        row_embeds.push(embeds);
        image_spans.push(spans);
    }
    let lengths: Vec<i64> = row_embeds.iter().map(|e| e.size()[0]).collect();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let mut padded = Vec::with_capacity(rows.len());
    let mut mask = vec![0i64; rows.len() * max_len as usize];
    for (b, e) in row_embeds.iter().enumerate() {
        let n = lengths[b];
        let pad = Tensor::f_zeros([max_len - n, hidden], (e.kind(), e.device()))?;
        padded.push(Tensor::f_cat(&[e, &pad], 0)?);
        mask[b * max_len as usize..b * max_len as usize + n as usize].fill(1);
    }
    let device = model.embed_tokens.device();
    Ok(Spliced {
        inputs_embeds: Tensor::f_stack(&padded, 0)?,
        attention_mask: Tensor::f_from_slice(&mask)?.f_reshape([rows.len() as i64, max_len])?.f_to_device(device)?,
        lengths,
        image_spans,
    })
}
