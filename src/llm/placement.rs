//! Where the decoder's parts live: the `--device-map` and `--max-gpu-memory` parsers, and the planner that
//! spreads decoder layers over GPUs by memory as the release's `device_map="auto"` does (accelerate 0.21's
//! balanced map), sending what does not fit to the CPU. Plain Rust: the model turns a [`Plan`] into
//! libtorch devices.
//!
//! A plan has three kinds of parts: the front (vision tower, projector, token embeddings) goes with the
//! first layers, each decoder layer goes somewhere, and the head (final norm, lm_head) goes after the last
//! layer.
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use tch::Device;

/// How a model is spread over devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Placement {
    /// Everything on one device.
    #[default]
    Single,
    /// Over every visible GPU by free memory (or `MemoryLimits`), balanced, what does not fit on the CPU:
    /// the release's `device_map="auto"`.
    Auto(MemoryLimits),
    /// As a `--device-map` says.
    Map(LayerMap),
}

/// A device a part can be placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    Cpu,
    Cuda(usize),
}

impl Place {
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "cpu" => Ok(Place::Cpu),
            "cuda" => Ok(Place::Cuda(0)),
            "mps" => {
                Err(placement("`mps` cannot take part in a device map: only cpu and cuda devices can be split over"))
            }
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(Place::Cuda(index)),
                _ => Err(placement(format!("unknown device `{other}`: expected cpu, cuda or cuda:N"))),
            },
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Place::Cuda(_))
    }
}

impl From<Place> for Device {
    fn from(place: Place) -> Self {
        match place {
            Place::Cpu => Device::Cpu,
            Place::Cuda(index) => Device::Cuda(index),
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Cpu => write!(f, "cpu"),
            Place::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

fn placement(message: impl Into<String>) -> Error {
    Error::Placement(message.into())
}

/// Decoder layers `layers` (0-based, end excluded) on `place`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub place: Place,
    pub layers: Range<usize>,
}

/// A `--device-map`: decoder-layer ranges per device, in the order written, e.g.
/// `cuda:0=0-15,cuda:1=16-31` or `cuda:0=0-27,cpu=28-31`. A device may appear in several entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    pub segments: Vec<Segment>,
}

impl LayerMap {
    pub fn parse(text: &str) -> Result<Self> {
        let mut segments = Vec::new();
        for entry in text.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(placement(format!("device map `{text}`: empty entry (expected DEVICE=FIRST-LAST)")));
            }
            let (device, range) = entry.split_once('=').ok_or_else(|| {
                placement(format!("device map entry `{entry}`: expected DEVICE=FIRST-LAST, e.g. cuda:0=0-15"))
            })?;
            let place =
                Place::parse(device.trim()).map_err(|e| placement(format!("device map entry `{entry}`: {e}")))?;
            let layer = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| placement(format!("device map entry `{entry}`: `{}` is not a layer number", s.trim())))
            };
            let (first, last) = match range.split_once('-') {
                Some((a, b)) => (layer(a)?, layer(b)?),
                None => (layer(range)?, layer(range)?),
            };
            if first > last {
                return Err(placement(format!("device map entry `{entry}`: range {first}-{last} runs backwards")));
            }
            segments.push(Segment { place, layers: first..last + 1 });
        }
        Ok(Self { segments })
    }

    /// The plan for a decoder of `num_layers` layers: every layer in exactly one entry. The front goes
    /// with layer 0, the head with the last layer.
    pub fn plan(&self, num_layers: usize) -> Result<Plan> {
        let mut owner: Vec<Option<&Segment>> = vec![None; num_layers];
        for segment in &self.segments {
            if segment.layers.end > num_layers {
                return Err(placement(format!(
                    "device map entry `{}` names layer {}, but the model's layers are 0-{}",
                    segment,
                    segment.layers.end - 1,
                    num_layers.saturating_sub(1)
                )));
            }
            for layer in segment.layers.clone() {
                if let Some(other) = owner[layer] {
                    return Err(placement(format!(
                        "device map places layer {layer} twice: in `{other}` and in `{segment}`"
                    )));
                }
                owner[layer] = Some(segment);
            }
        }
        let missing: Vec<usize> = (0..num_layers).filter(|&i| owner[i].is_none()).collect();
        if !missing.is_empty() {
            return Err(placement(format!(
                "device map leaves layer(s) {} of 0-{} on no device",
                ranges_text(&missing),
                num_layers - 1
            )));
        }
        let layers: Vec<Place> = owner.iter().flatten().map(|s| s.place).collect();
        let (front, head) = match (layers.first(), layers.last()) {
            (Some(&first), Some(&last)) => (first, last),
            // A decoder without layers (vision-only checkpoints): everything where the map's first entry is.
            _ => {
                let place = self.segments.first().map_or(Place::Cpu, |s| s.place);
                (place, place)
            }
        };
        Ok(Plan { front, layers, head, notes: Vec::new() })
    }

    /// Every device the map names.
    pub fn places(&self) -> Vec<Place> {
        let mut places: Vec<Place> = self.segments.iter().map(|s| s.place).collect();
        places.dedup();
        places
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}-{}", self.place, self.layers.start, self.layers.end.saturating_sub(1))
    }
}

/// `1-3, 7` for `[1, 2, 3, 7]`.
fn ranges_text(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { layers[i].to_string() } else { format!("{}-{}", layers[i], layers[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// A byte count: a plain number of bytes or a number with a unit, decimal (`KB`, `MB`, `GB`, `TB`) or
/// binary (`KiB`, `MiB`, `GiB`, `TiB`), case ignored: `20GiB`, `1.5GB`, `500000000`.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(placement(format!(
                "memory size `{text}`: unknown unit `{unit}` (expected B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            )))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| placement(format!("memory size `{text}`: expected a number with a unit, e.g. 20GiB")))?;
    Ok((value * scale).round() as u64)
}

/// A `--max-gpu-memory`: one size for every GPU (`20GiB`), or sizes per device
/// (`0:20GiB,1:20GiB`, keys `N`, `cuda:N` or `cpu`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryLimits {
    /// For GPUs not named in `per_gpu`.
    pub every_gpu: Option<u64>,
    pub per_gpu: BTreeMap<usize, u64>,
    pub cpu: Option<u64>,
}

impl MemoryLimits {
    pub fn parse(text: &str) -> Result<Self> {
        let mut limits = Self::default();
        let entries: Vec<&str> = text.split(',').map(str::trim).collect();
        if entries.len() == 1 && !entries[0].contains(':') && !entries[0].is_empty() {
            limits.every_gpu = Some(parse_size(entries[0])?);
            return Ok(limits);
        }
        for entry in entries {
            let (key, size) = entry.rsplit_once(':').ok_or_else(|| {
                placement(format!("--max-gpu-memory entry `{entry}`: expected DEVICE:SIZE, e.g. 0:20GiB"))
            })?;
            let size = parse_size(size).map_err(|e| placement(format!("--max-gpu-memory entry `{entry}`: {e}")))?;
            let key = key.trim();
            let place = match key.parse::<usize>() {
                Ok(index) => Place::Cuda(index),
                Err(_) => Place::parse(key).map_err(|e| placement(format!("--max-gpu-memory entry `{entry}`: {e}")))?,
            };
            let duplicate = match place {
                Place::Cpu => limits.cpu.replace(size).is_some(),
                Place::Cuda(index) => limits.per_gpu.insert(index, size).is_some(),
            };
            if duplicate {
                return Err(placement(format!("--max-gpu-memory names {place} twice")));
            }
        }
        Ok(limits)
    }

    pub fn gpu(&self, index: usize) -> Option<u64> {
        self.per_gpu.get(&index).copied().or(self.every_gpu)
    }
}

/// Bytes of each part's weights in the compute dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSizes {
    /// Vision tower, projector and token embeddings.
    pub front: u64,
    pub layers: Vec<u64>,
    /// Final norm and lm_head.
    pub head: u64,
}

/// Memory each device may take: GPUs by index, in the order they are filled, then the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    pub gpus: Vec<(usize, u64)>,
    pub cpu: u64,
}

/// Where every part goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Vision tower, projector and token embeddings.
    pub front: Place,
    pub layers: Vec<Place>,
    /// Final norm and lm_head.
    pub head: Place,
    /// Warnings for the user (layers offloaded to the CPU, budgets that could not be read).
    pub notes: Vec<String>,
}

impl Plan {
    pub fn single(place: Place, num_layers: usize) -> Self {
        Self { front: place, layers: vec![place; num_layers], head: place, notes: Vec::new() }
    }

    /// Consecutive layers on one device.
    pub fn segments(&self) -> Vec<Segment> {
        let mut segments: Vec<Segment> = Vec::new();
        for (i, &place) in self.layers.iter().enumerate() {
            match segments.last_mut() {
                Some(last) if last.place == place => last.layers.end = i + 1,
                _ => segments.push(Segment { place, layers: i..i + 1 }),
            }
        }
        segments
    }

    /// The layers in `--device-map` syntax, and where the front and head go.
    pub fn describe(&self) -> String {
        let map = self.segments().iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        format!("{map} (vision tower, projector, embeddings on {}; norm, lm_head on {})", self.front, self.head)
    }

    /// Whether the plan uses more than one device, or more than one segment.
    pub fn is_split(&self) -> bool {
        self.segments().len() > 1 || self.front != self.head || self.layers.first().is_some_and(|&l| l != self.front)
    }

    pub fn uses_cuda(&self) -> bool {
        self.front.is_cuda() || self.head.is_cuda() || self.layers.iter().any(|p| p.is_cuda())
    }
}

/// Spreads the parts over the GPUs as accelerate's balanced `device_map="auto"` does, in order (front,
/// layers, head), then over the CPU:
///
/// - every GPU but the last is capped to the model's size divided by the GPU count, plus 1.25 times the
///   largest layer (so rounding does not push the last layers off the GPUs); the last keeps its budget;
/// - the first GPU and the CPU keep room for the largest part still to be placed (accelerate keeps it to
///   bring back an offloaded layer; here it leaves the first GPU room for activations and the KV cache);
/// - a part that does not fit moves everything after it to the next device; layers that reach the CPU
///   are offloaded there, with a note.
pub fn plan_balanced(sizes: &PartSizes, budgets: &Budgets) -> Result<Plan> {
    let gpus: Vec<(usize, u64)> = budgets.gpus.iter().copied().filter(|&(_, bytes)| bytes > 0).collect();
    let units: Vec<u64> =
        std::iter::once(sizes.front).chain(sizes.layers.iter().copied()).chain(std::iter::once(sizes.head)).collect();
    let total: u64 = units.iter().sum();
    let largest_layer = sizes.layers.iter().copied().max().unwrap_or(0);
    let mut caps: Vec<(Place, u64)> = gpus.iter().map(|&(i, bytes)| (Place::Cuda(i), bytes)).collect();
    if caps.len() > 1 {
        let per_gpu = total / caps.len() as u64 + largest_layer + largest_layer / 4;
        let last = caps.len() - 1;
        for (_, cap) in &mut caps[..last] {
            *cap = (*cap).min(per_gpu);
        }
    }
    caps.push((Place::Cpu, budgets.cpu));
    // Largest part after each one: the room the first GPU and the CPU keep free.
    let mut reserve = vec![0u64; units.len()];
    for i in (0..units.len().saturating_sub(1)).rev() {
        reserve[i] = reserve[i + 1].max(units[i + 1]);
    }
    let mut places = Vec::with_capacity(units.len());
    let (mut device, mut used) = (0usize, 0u64);
    for (i, &size) in units.iter().enumerate() {
        loop {
            let (place, cap) = caps[device];
            let keeps_room = device == 0 || place == Place::Cpu;
            let cap = if keeps_room { cap.saturating_sub(reserve[i]) } else { cap };
            if used + size <= cap {
                used += size;
                places.push(place);
                break;
            }
            if place == Place::Cpu {
                return Err(placement(format!(
                    "the model does not fit: {} ({}) finds no room on the GPUs and the CPU has {} of its {} left{}",
                    part_name(i, sizes.layers.len()),
                    gib(size),
                    gib(cap.saturating_sub(used)),
                    gib(budgets.cpu),
                    if reserve[i] > 0 {
                        format!(" (keeping {} for the largest part still to place)", gib(reserve[i]))
                    } else {
                        String::new()
                    }
                )));
            }
            device += 1;
            used = 0;
        }
    }
    let head = places.pop().unwrap_or(Place::Cpu);
    let front = if places.is_empty() { head } else { places.remove(0) };
    let mut plan = Plan { front, layers: places, head, notes: Vec::new() };
    if !gpus.is_empty() {
        let offloaded: Vec<usize> = (0..plan.layers.len()).filter(|&i| plan.layers[i] == Place::Cpu).collect();
        let budget_text =
            gpus.iter().map(|&(i, bytes)| format!("cuda:{i} {}", gib(bytes))).collect::<Vec<_>>().join(", ");
        if !offloaded.is_empty() {
            plan.notes.push(format!(
                "decoder layer(s) {} of 0-{} do not fit in the GPU memory budget ({budget_text}) and run on the CPU: \
                 expect slow answers",
                ranges_text(&offloaded),
                plan.layers.len() - 1
            ));
        }
        for (part, place) in
            [("the vision tower, projector and embeddings", plan.front), ("the norm and lm_head", plan.head)]
        {
            if place == Place::Cpu {
                plan.notes
                    .push(format!("{part} do not fit in the GPU memory budget ({budget_text}) and run on the CPU"));
            }
        }
    }
    Ok(plan)
}

fn part_name(unit: usize, num_layers: usize) -> String {
    match unit {
        0 => "the vision tower, projector and embeddings".into(),
        u if u <= num_layers => format!("decoder layer {}", u - 1),
        _ => "the norm and lm_head".into(),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A 7B-shaped fp16 model: vision + projector + embeddings 0.85 GiB, 32 layers of 0.38 GiB, head 0.24 GiB.
    fn seven_b() -> PartSizes {
        PartSizes { front: 850 << 20, layers: vec![389 << 20; 32], head: 250 << 20 }
    }

    fn layers_on(plan: &Plan, place: Place) -> usize {
        plan.layers.iter().filter(|&&p| p == place).count()
    }

    #[test]
    fn two_large_gpus_split_the_layers_in_balance() {
        let plan =
            plan_balanced(&seven_b(), &Budgets { gpus: vec![(0, 80 * GIB), (1, 80 * GIB)], cpu: 64 * GIB }).unwrap();
        assert_eq!(plan.front, Place::Cuda(0));
        assert_eq!(plan.head, Place::Cuda(1));
        // Total 13548 MiB: cuda:0 is capped at 13548 / 2 + 1.25 * 389 = 7260 MiB, less 389 kept free:
        // (6871 - 850) / 389 = 15 layers after the front; cuda:1 takes the other 17 and the head.
        let (first, second) = (layers_on(&plan, Place::Cuda(0)), layers_on(&plan, Place::Cuda(1)));
        assert_eq!((first, second), (15, 17), "{}", plan.describe());
        // Consecutive: cuda:0 takes the first layers, cuda:1 the rest.
        assert_eq!(plan.segments().len(), 2, "{}", plan.describe());
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    }

    #[test]
    fn balancing_follows_the_formula() {
        // front 10, layers 10 x 10, head 10: total 120; per GPU 120/3 + 10 + 2 = 52.
        let sizes = PartSizes { front: 10, layers: vec![10; 10], head: 10 };
        let plan = plan_balanced(&sizes, &Budgets { gpus: vec![(0, 1000), (1, 1000), (2, 1000)], cpu: 1000 }).unwrap();
        // cuda:0: 52 - 10 kept free = 42: front + 3 layers (40). cuda:1: 52: 5 layers. cuda:2: the rest.
        assert_eq!(layers_on(&plan, Place::Cuda(0)), 3, "{}", plan.describe());
        assert_eq!(layers_on(&plan, Place::Cuda(1)), 5, "{}", plan.describe());
        assert_eq!(layers_on(&plan, Place::Cuda(2)), 2, "{}", plan.describe());
        assert_eq!(plan.head, Place::Cuda(2));
    }

    #[test]
    fn one_small_gpu_offloads_the_last_layers_to_the_cpu_with_a_note() {
        // 8 GiB on one GPU: the front, then layers until 8 GiB less one layer is used.
        let plan = plan_balanced(&seven_b(), &Budgets { gpus: vec![(0, 8 * GIB)], cpu: 64 * GIB }).unwrap();
        let on_gpu = layers_on(&plan, Place::Cuda(0));
        assert_eq!(on_gpu, ((8 * GIB - (389 << 20) - (850 << 20)) / (389 << 20)) as usize);
        assert_eq!(plan.layers[..on_gpu], vec![Place::Cuda(0); on_gpu][..]);
        assert!(plan.layers[on_gpu..].iter().all(|&p| p == Place::Cpu));
        assert_eq!(plan.head, Place::Cpu);
        assert_eq!(plan.notes.len(), 2, "{:?}", plan.notes);
        assert!(plan.notes[0].contains(&format!("{on_gpu}-31 of 0-31")), "{}", plan.notes[0]);
        assert!(plan.notes[0].contains("run on the CPU"), "{}", plan.notes[0]);
    }

    #[test]
    fn a_model_that_fits_one_gpu_stays_there() {
        let plan = plan_balanced(&seven_b(), &Budgets { gpus: vec![(0, 40 * GIB)], cpu: 64 * GIB }).unwrap();
        assert_eq!(plan, Plan::single(Place::Cuda(0), 32));
        assert!(!plan.is_split());
    }

    #[test]
    fn gpus_without_budget_are_skipped_and_the_order_is_kept() {
        let plan = plan_balanced(&seven_b(), &Budgets { gpus: vec![(0, 0), (1, 40 * GIB)], cpu: 64 * GIB }).unwrap();
        assert_eq!(plan, Plan::single(Place::Cuda(1), 32));
    }

    #[test]
    fn no_gpu_puts_everything_on_the_cpu_without_a_note() {
        let plan = plan_balanced(&seven_b(), &Budgets { gpus: vec![], cpu: 64 * GIB }).unwrap();
        assert_eq!(plan, Plan::single(Place::Cpu, 32));
    }

    #[test]
    fn a_model_too_large_for_every_budget_is_an_error_naming_the_part() {
        let err = plan_balanced(&seven_b(), &Budgets { gpus: vec![(0, 4 * GIB)], cpu: 4 * GIB }).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("does not fit") && text.contains("decoder layer"), "{text}");
    }

    #[test]
    fn device_maps_parse_and_cover_every_layer() {
        let map = LayerMap::parse("cuda:0=0-15, cuda:1=16-31").unwrap();
        let plan = map.plan(32).unwrap();
        assert_eq!(plan.front, Place::Cuda(0));
        assert_eq!(plan.head, Place::Cuda(1));
        assert_eq!(
            plan.segments().iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["cuda:0=0-15", "cuda:1=16-31"]
        );
        let plan = LayerMap::parse("cuda=0-27,cpu=28-31").unwrap().plan(32).unwrap();
        assert_eq!(layers_on(&plan, Place::Cpu), 4);
        assert_eq!(plan.head, Place::Cpu);
        // Single layers, entries out of order, one device twice.
        let plan = LayerMap::parse("cpu=1,cpu=0-0").unwrap().plan(2).unwrap();
        assert_eq!(plan, Plan::single(Place::Cpu, 2));
        assert_eq!(LayerMap::parse("cpu=0-0,cpu=1-1").unwrap().segments.len(), 2);
        let plan = LayerMap::parse("cuda:1=4-7,cuda:0=0-3").unwrap().plan(8).unwrap();
        assert_eq!((plan.front, plan.head), (Place::Cuda(0), Place::Cuda(1)));
    }

    #[test]
    fn malformed_device_maps_are_refused_with_the_reason() {
        for (text, expected) in [
            ("", "empty entry"),
            ("cuda:0=0-15,", "empty entry"),
            ("cuda:0", "expected DEVICE=FIRST-LAST"),
            ("tpu=0-3", "unknown device `tpu`"),
            ("cuda:x=0-3", "unknown device `cuda:x`"),
            ("mps=0-3", "mps"),
            ("cpu=a-3", "`a` is not a layer number"),
            ("cpu=0-", "`` is not a layer number"),
            ("cpu=-1-3", "is not a layer number"),
            ("cpu=5-2", "runs backwards"),
        ] {
            let err = LayerMap::parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "`{text}`: {err}");
        }
    }

    #[test]
    fn maps_that_do_not_cover_the_layers_exactly_once_are_refused() {
        for (text, expected) in [
            ("cuda:0=0-15,cuda:1=16-30", "layer(s) 31 of 0-31 on no device"),
            ("cuda:0=0-9,cuda:1=20-31", "layer(s) 10-19 of 0-31"),
            ("cuda:0=0-15,cuda:1=15-31", "places layer 15 twice: in `cuda:0=0-15` and in `cuda:1=15-31`"),
            ("cuda:0=0-15,cuda:1=16-32", "names layer 32, but the model's layers are 0-31"),
        ] {
            let err = LayerMap::parse(text).unwrap().plan(32).expect_err(text).to_string();
            assert!(err.contains(expected), "`{text}`: {err}");
        }
    }

    #[test]
    fn sizes_and_memory_limits_parse() {
        assert_eq!(parse_size("20GiB").unwrap(), 20 * GIB);
        assert_eq!(parse_size("20gib").unwrap(), 20 * GIB);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        let limits = MemoryLimits::parse("0:20GiB,1:22GiB,cpu:64GiB").unwrap();
        assert_eq!((limits.gpu(0), limits.gpu(1), limits.gpu(2)), (Some(20 * GIB), Some(22 * GIB), None));
        assert_eq!(limits.cpu, Some(64 * GIB));
        let limits = MemoryLimits::parse("cuda:1:10GiB").unwrap();
        assert_eq!(limits.gpu(1), Some(10 * GIB));
        let every = MemoryLimits::parse("13GiB").unwrap();
        assert_eq!((every.gpu(0), every.gpu(5)), (Some(13 * GIB), Some(13 * GIB)));
    }

    #[test]
    fn malformed_memory_limits_are_refused_with_the_reason() {
        for (text, expected) in [
            ("20XB", "unknown unit `XB`"),
            ("0:20XB", "unknown unit"),
            ("GiB", "expected a number"),
            ("0:", "expected a number"),
            ("0=20GiB,1:3GiB", "expected DEVICE:SIZE"),
            ("tpu:3GiB,0:1GiB", "unknown device `tpu`"),
            ("0:1GiB,0:2GiB", "names cuda:0 twice"),
            ("1.2.3GiB", "expected a number"),
        ] {
            let err = MemoryLimits::parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "`{text}`: {err}");
        }
    }
}
