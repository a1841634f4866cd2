//! Reads the tensor index of a PyTorch `torch.save` zip archive (`pytorch_model*.bin`, `mm_projector.bin`,
//! `non_lora_trainables.bin`) without executing anything: a pickle interpreter for the subset of opcodes
//! `torch.save` emits, whose only callables are the tensor-rebuild functions and `OrderedDict`.
//! Any other global is refused by name.
use std::collections::HashMap;

/// Storage classes `torch.save` names, with the dtype of their elements.
const STORAGE_TYPES: [(&str, safetensors::Dtype); 10] = [
    ("FloatStorage", safetensors::Dtype::F32),
    ("HalfStorage", safetensors::Dtype::F16),
    ("BFloat16Storage", safetensors::Dtype::BF16),
    ("DoubleStorage", safetensors::Dtype::F64),
    ("LongStorage", safetensors::Dtype::I64),
    ("IntStorage", safetensors::Dtype::I32),
    ("ShortStorage", safetensors::Dtype::I16),
    ("CharStorage", safetensors::Dtype::I8),
    ("ByteStorage", safetensors::Dtype::U8),
    ("BoolStorage", safetensors::Dtype::BOOL),
];

/// One tensor of the archive: a view into a storage record `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    pub dtype: safetensors::Dtype,
    /// Offset into the storage, in elements.
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// An allowed callable, by its qualified name.
    Global(String),
    Storage {
        key: String,
        dtype: safetensors::Dtype,
    },
    Tensor(TensorRef),
    Mark,
}

pub type PickleResult<T> = Result<T, String>;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> PickleResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("pickle ends early")?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> PickleResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PickleResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> PickleResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> PickleResult<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
        let text = String::from_utf8(rest[..end].to_vec()).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += end + 1;
        Ok(text)
    }
    fn utf8(&mut self, n: usize) -> PickleResult<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
}

/// Only these callables may appear; everything else is refused before anything is built.
fn allowed_global(module: &str, name: &str) -> PickleResult<Value> {
    let qualified = format!("{module}.{name}");
    match (module, name) {
        ("collections", "OrderedDict")
        | ("torch._utils", "_rebuild_tensor_v2")
        | ("torch._utils", "_rebuild_parameter") => Ok(Value::Global(qualified)),
        ("torch", storage) if STORAGE_TYPES.iter().any(|(s, _)| *s == storage) => Ok(Value::Global(qualified)),
        _ => Err(format!("refused global `{qualified}`: only tensors and state dicts are read (nothing was executed)")),
    }
}

fn int(v: &Value) -> PickleResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => Err(format!("expected an integer, found {other:?}")),
    }
}

fn ints(v: &Value) -> PickleResult<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(int).collect(),
        other => Err(format!("expected a tuple of integers, found {other:?}")),
    }
}

fn reduce(callable: Value, args: Value) -> PickleResult<Value> {
    let Value::Global(name) = callable else { return Err(format!("cannot call {callable:?}")) };
    let Value::Tuple(args) = args else { return Err(format!("{name}: arguments are not a tuple")) };
    match name.as_str() {
        "collections.OrderedDict" if args.is_empty() => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" => {
            let [storage, offset, shape, stride, ..] = args.as_slice() else {
                return Err("_rebuild_tensor_v2: too few arguments".into());
            };
            let Value::Storage { key, dtype } = storage else {
                return Err("_rebuild_tensor_v2: first argument is not a storage".into());
            };
            Ok(Value::Tensor(TensorRef {
                storage_key: key.clone(),
                dtype: *dtype,
                offset: int(offset)?,
                shape: ints(shape)?,
                stride: ints(stride)?,
            }))
        }
        "torch._utils._rebuild_parameter" => match args.into_iter().next() {
            Some(tensor @ Value::Tensor(_)) => Ok(tensor),
            _ => Err("_rebuild_parameter: first argument is not a tensor".into()),
        },
        other => Err(format!("`{other}` cannot be called with these arguments")),
    }
}

/// `('storage', torch.XStorage, key, location, numel)`.
fn persistent_load(pid: Value) -> PickleResult<Value> {
    let Value::Tuple(items) = pid else { return Err("persistent id is not a tuple".into()) };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(class), Value::Str(key), _location, _numel] if tag == "storage" => {
            let short = class.rsplit('.').next().unwrap_or_default();
            let dtype = STORAGE_TYPES.iter().find(|(s, _)| *s == short).map(|(_, d)| *d).ok_or("unknown storage")?;
            Ok(Value::Storage { key: key.clone(), dtype })
        }
        _ => Err(format!("unsupported persistent id {items:?}")),
    }
}

fn pop_mark(stack: &mut Vec<Value>) -> PickleResult<Vec<Value>> {
    let mark = stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("MARK missing")?;
    let items = stack.split_off(mark + 1);
    stack.pop();
    Ok(items)
}

fn pairs(items: Vec<Value>) -> PickleResult<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// Interprets `data.pkl` and returns the state dict's tensors by name, in pickle order.
pub fn read_state_dict(pickle: &[u8]) -> PickleResult<Vec<(String, TensorRef)>> {
    let mut r = Reader { data: pickle, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| "pickle stack underflow".to_string());
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.take(8)?; // FRAME
            }
            b'.' => break, // STOP
            b'(' => stack.push(Value::Mark),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes
                let n = r.u8()? as usize;
                let bytes = r.take(n)?;
                if n > 8 {
                    return Err("integer too large".into());
                }
                let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                buf[..n].copy_from_slice(bytes);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                r.take(8)?; // BINFLOAT: no float is needed to rebuild a tensor
                stack.push(Value::Float);
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.utf8(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.utf8(n)?));
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(allowed_global(&module, &name)?);
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(allowed_global(&m, &n)?),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'q' => {
                let i = r.u8()? as u32;
                memo.insert(i, stack.last().ok_or("BINPUT on empty stack")?.clone());
            }
            b'r' => {
                let i = r.u32()?;
                memo.insert(i, stack.last().ok_or("LONG_BINPUT on empty stack")?.clone());
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(i, stack.last().ok_or("MEMOIZE on empty stack")?.clone());
            }
            b'h' => {
                let i = r.u8()? as u32;
                stack.push(memo.get(&i).ok_or("BINGET of an unknown memo entry")?.clone());
            }
            b'j' => {
                let i = r.u32()?;
                stack.push(memo.get(&i).ok_or("LONG_BINGET of an unknown memo entry")?.clone());
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(reduce(callable, args)?);
            }
            b'b' => {
                // BUILD: only an OrderedDict's `__dict__` (`_metadata`), which is dropped.
                pop(&mut stack)?;
                if !matches!(stack.last(), Some(Value::Dict(_))) {
                    return Err("BUILD on something other than a dict".into());
                }
            }
            b's' => {
                let value = pop(&mut stack)?;
                let key = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(entries)) => entries.push((key, value)),
                    _ => return Err("SETITEM on something other than a dict".into()),
                }
            }
            b'u' => {
                let items = pairs(pop_mark(&mut stack)?)?;
                match stack.last_mut() {
                    Some(Value::Dict(entries)) => entries.extend(items),
                    _ => return Err("SETITEMS on something other than a dict".into()),
                }
            }
            b'a' => {
                let value = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(items)) => items.push(value),
                    _ => return Err("APPEND on something other than a list".into()),
                }
            }
            b'e' => {
                let values = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(items)) => items.extend(values),
                    _ => return Err("APPENDS on something other than a list".into()),
                }
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", r.pos - 1)),
        }
    }
    let top = stack.pop().ok_or("empty pickle")?;
    let Value::Dict(entries) = top else { return Err("the archive does not hold a state dict".into()) };
    let mut tensors = Vec::new();
    for (key, value) in entries {
        match (key, value) {
            (Value::Str(name), Value::Tensor(t)) => tensors.push((name, t)),
            (Value::Str(name), other) => return Err(format!("entry `{name}` is not a tensor ({})", describe(&other))),
            (key, _) => return Err(format!("state dict key {key:?} is not a string")),
        }
    }
    Ok(tensors)
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float => "float",
        Value::Str(_) => "str",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Global(_) => "callable",
        Value::Storage { .. } => "storage",
        Value::Tensor(_) => "tensor",
        Value::Mark => "mark",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_global_is_refused_by_name() {
        // GLOBAL 'os system' then STOP: never executed, refused when read.
        let pickle = b"\x80\x02cos\nsystem\nq\x00.";
        let err = read_state_dict(pickle).unwrap_err();
        assert!(err.contains("refused global `os.system`"), "{err}");
    }

    #[test]
    fn truncated_pickles_are_errors() {
        assert!(read_state_dict(b"\x80\x02}q\x00(X\x05\x00\x00\x00ab").is_err());
    }
}
