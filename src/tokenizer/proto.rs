//! A minimal reader for SentencePiece's `ModelProto` (proto2 wire format), limited to the fields
//! that change how text is encoded or decoded. Unknown fields are skipped, as protobuf requires.

/// A piece's index in the model's vocabulary.
pub type TokenId = u32;

/// Piece types, numbered as in `sentencepiece_model.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_wire(value: u64) -> Option<Self> {
        Some(match value {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProtoPiece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

/// The trainer and normalizer fields that matter at inference, with proto2 defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProto {
    pub pieces: Vec<ProtoPiece>,
    pub model_type: ModelType,
    pub byte_fallback: bool,
    pub split_digits: bool,
    pub treat_whitespace_as_suffix: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_surface: String,
    pub normalizer_name: String,
    pub precompiled_charsmap_len: usize,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
    /// Whether the denormalizer spec carries a character map (decoding would then rewrite text).
    pub has_denormalizer: bool,
}

impl Default for ModelProto {
    fn default() -> Self {
        ModelProto {
            pieces: Vec::new(),
            model_type: ModelType::Unigram,
            byte_fallback: false,
            split_digits: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_surface: " \u{2047} ".to_string(),
            normalizer_name: String::new(),
            precompiled_charsmap_len: 0,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            has_denormalizer: false,
        }
    }
}

/// Errors are plain messages; the caller adds the file name.
pub type ParseResult<T> = std::result::Result<T, String>;

/// One field read from the wire: its number and its payload.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> ParseResult<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, len: usize) -> ParseResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| format!("field of {len} bytes at byte {} runs past the end", self.pos))?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn field(&mut self) -> ParseResult<(u64, Value<'a>)> {
        let key = self.varint()?;
        let number = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflows".to_string())?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => return Err(format!("unsupported wire type {wire} for field {number}")),
        };
        Ok((number, value))
    }
}

fn utf8(bytes: &[u8], what: &str) -> ParseResult<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
}

fn as_bool(value: &Value, what: &str) -> ParseResult<bool> {
    match value {
        Value::Varint(v) => Ok(*v != 0),
        _ => Err(format!("{what}: expected a varint")),
    }
}

fn as_i32(value: &Value, what: &str) -> ParseResult<i32> {
    match value {
        // proto2 int32 is sign-extended to 64 bits on the wire.
        Value::Varint(v) => Ok(*v as i64 as i32),
        _ => Err(format!("{what}: expected a varint")),
    }
}

fn as_bytes<'a>(value: &Value<'a>, what: &str) -> ParseResult<&'a [u8]> {
    match value {
        Value::Bytes(b) => Ok(b),
        _ => Err(format!("{what}: expected a length-delimited field")),
    }
}

fn parse_piece(buf: &[u8]) -> ParseResult<ProtoPiece> {
    let mut piece = ProtoPiece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut r = Reader::new(buf);
    while !r.done() {
        match r.field()? {
            (1, v) => piece.piece = utf8(as_bytes(&v, "piece")?, "piece")?,
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (2, _) => return Err("piece score: expected a float".into()),
            (3, Value::Varint(t)) => {
                piece.kind = PieceType::from_wire(t).ok_or_else(|| format!("unknown piece type {t}"))?
            }
            (3, _) => return Err("piece type: expected a varint".into()),
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer_spec(buf: &[u8], m: &mut ModelProto) -> ParseResult<()> {
    let mut r = Reader::new(buf);
    while !r.done() {
        let (number, v) = r.field()?;
        match number {
            3 => {
                m.model_type = match v {
                    Value::Varint(1) => ModelType::Unigram,
                    Value::Varint(2) => ModelType::Bpe,
                    Value::Varint(3) => ModelType::Word,
                    Value::Varint(4) => ModelType::Char,
                    _ => return Err("trainer_spec.model_type: unknown value".into()),
                }
            }
            24 => m.treat_whitespace_as_suffix = as_bool(&v, "treat_whitespace_as_suffix")?,
            25 => m.split_digits = as_bool(&v, "split_digits")?,
            35 => m.byte_fallback = as_bool(&v, "byte_fallback")?,
            40 => m.unk_id = as_i32(&v, "unk_id")?,
            41 => m.bos_id = as_i32(&v, "bos_id")?,
            42 => m.eos_id = as_i32(&v, "eos_id")?,
            43 => m.pad_id = as_i32(&v, "pad_id")?,
            44 => m.unk_surface = utf8(as_bytes(&v, "unk_surface")?, "unk_surface")?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer_spec(buf: &[u8], m: &mut ModelProto) -> ParseResult<()> {
    let mut r = Reader::new(buf);
    while !r.done() {
        let (number, v) = r.field()?;
        match number {
            1 => m.normalizer_name = utf8(as_bytes(&v, "normalizer name")?, "normalizer name")?,
            2 => m.precompiled_charsmap_len = as_bytes(&v, "precompiled_charsmap")?.len(),
            3 => m.add_dummy_prefix = as_bool(&v, "add_dummy_prefix")?,
            4 => m.remove_extra_whitespaces = as_bool(&v, "remove_extra_whitespaces")?,
            5 => m.escape_whitespaces = as_bool(&v, "escape_whitespaces")?,
            _ => {}
        }
    }
    Ok(())
}

fn denormalizer_has_charsmap(buf: &[u8]) -> ParseResult<bool> {
    let mut r = Reader::new(buf);
    let mut found = false;
    while !r.done() {
        if let (2, v) = r.field()? {
            found = !as_bytes(&v, "denormalizer precompiled_charsmap")?.is_empty();
        }
    }
    Ok(found)
}

/// Parses a serialized `ModelProto`. Embedded messages that occur more than once are merged, as
/// proto2 does.
pub fn parse_model_proto(buf: &[u8]) -> ParseResult<ModelProto> {
    let mut m = ModelProto::default();
    let mut r = Reader::new(buf);
    while !r.done() {
        let (number, v) = r.field()?;
        match number {
            1 => m.pieces.push(parse_piece(as_bytes(&v, "pieces")?)?),
            2 => parse_trainer_spec(as_bytes(&v, "trainer_spec")?, &mut m)?,
            3 => parse_normalizer_spec(as_bytes(&v, "normalizer_spec")?, &mut m)?,
            5 => m.has_denormalizer |= denormalizer_has_charsmap(as_bytes(&v, "denormalizer_spec")?)?,
            _ => {}
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(number: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    #[test]
    fn reads_pieces_and_specs_with_defaults() {
        let mut piece = Vec::new();
        bytes_field(1, "▁a".as_bytes(), &mut piece);
        piece.push(2 << 3 | 5);
        piece.extend_from_slice(&(-3.5f32).to_le_bytes());
        let mut trainer = Vec::new();
        varint(3 << 3, &mut trainer);
        varint(2, &mut trainer);
        varint(35 << 3, &mut trainer);
        varint(1, &mut trainer);
        varint(43 << 3, &mut trainer);
        varint(u64::MAX, &mut trainer); // -1 sign-extended
        let mut normalizer = Vec::new();
        varint(4 << 3, &mut normalizer);
        varint(0, &mut normalizer);
        let mut model = Vec::new();
        bytes_field(1, &piece, &mut model);
        bytes_field(2, &trainer, &mut model);
        bytes_field(3, &normalizer, &mut model);

        let m = parse_model_proto(&model).unwrap();
        assert_eq!(m.pieces, vec![ProtoPiece { piece: "▁a".into(), score: -3.5, kind: PieceType::Normal }]);
        assert_eq!(m.model_type, ModelType::Bpe);
        assert!(m.byte_fallback);
        assert_eq!(m.pad_id, -1);
        assert!(m.add_dummy_prefix);
        assert!(!m.remove_extra_whitespaces);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut model = Vec::new();
        bytes_field(1, b"\x0a\x05ab", &mut model);
        assert!(parse_model_proto(&model).is_err());
        assert!(parse_model_proto(&[0x0a, 0xff]).is_err());
    }
}
