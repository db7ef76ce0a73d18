//! [`OpenCl`]: the [`Backend`] implementation.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ocl::core::{
    self, ArgVal, CommandQueue, Context, Kernel, KernelWorkGroupInfo, KernelWorkGroupInfoResult,
    Mem, MemFlags, Program, ProgramBuildInfo, ProgramBuildInfoResult,
};
use sage_core::norm;
use sage_core::{
    Accumulate, ApplyArgs, Backend, Coeffs, DType, Element, HostBuffers, ParamTensor, TensorMut,
};

use crate::buffer::{bytes, bytes_mut, ClBuffer, Place};
use crate::device::{describe, devices, DeviceDesc, Select};
use crate::reuse::Kept;
use crate::table::{present, Slot, Table};
use crate::{source, Error};

/// Work-items per work-group for the elementwise kernels (lowered where a kernel allows less).
const LOCAL: usize = 256;
/// Most tensors one launch takes (the device's parameter size may lower it).
const MAX_SLOTS: usize = 16;
/// Work-items per work-group of a step on CPU devices (times the run of each: 4096 elements).
const CPU_LOCAL: usize = 16;
/// Work-items (one per 4096-element chunk) per work-group of the norm pass on CPU devices.
const NORM_CPU_LOCAL: usize = 8;
/// Consecutive elements per work-item of a step on CPU devices (the default of
/// [`Builder::elements_per_item`]): enough vector iterations that a work-item's own cost (its
/// tensor's slot, the preset dispatch, the loop's set-up and tail) is paid once per many of
/// them — on PoCL 256 ran the step 10–25% faster than 64, and 1024 little faster than 256
/// (sage-opencl/README.md) — while a work-group (4 Ki elements) still leaves a mid-sized
/// tensor enough groups for every core.
pub const CPU_ELEMENTS_PER_ITEM: usize = 256;

fn u32_bytes(s: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any alignment of u8 is fine.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn u64_bytes(s: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any alignment of u8 is fine.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ProgramKey {
    Step(DType, DType),
    Norm(DType),
}

impl ProgramKey {
    fn name(self) -> String {
        match self {
            ProgramKey::Step(p, s) => format!("step {p}/{s}"),
            ProgramKey::Norm(e) => format!("norm partials {e}"),
        }
    }
}

/// What every clone of a backend shares: the device, its queue and the built programs.
struct Shared {
    desc: DeviceDesc,
    context: Context,
    queue: CommandQueue,
    options: CString,
    slots: usize,
    /// Consecutive elements each work-item of a step takes (see [`Builder::elements_per_item`]).
    per_item: usize,
    /// Whether norm partials accumulate in double (the device has `cl_khr_fp64` and the
    /// builder did not turn it off).
    norm_fp64: bool,
    max_alloc: u64,
    /// `CL_DEVICE_MEM_BASE_ADDR_ALIGN` in bytes: where a sub-buffer may start.
    align: usize,
    /// Multi-tensor launches enqueued so far, indexed by [`launch_index`]: packed steps (and
    /// floors), unpacked ones, packed norm passes, unpacked ones; then [`REUSED`].
    launches: [AtomicU64; 5],
    programs: Mutex<HashMap<ProgramKey, Program>>,
}

/// How to open an [`OpenCl`] backend: which device, extra compiler options.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    select: Select,
    queue: Option<ocl::Queue>,
    extra_options: String,
    max_slots: Option<usize>,
    per_item: Option<usize>,
    no_fp64_norms: bool,
}

impl Builder {
    /// Chooses the device (default: [`Select::Default`]).
    pub fn device(mut self, select: Select) -> Self {
        self.select = select;
        self
    }

    /// Runs on a framework's existing in-order queue (its context and device) instead of
    /// opening a device: buffers the framework allocates there are stepped without copies.
    pub fn queue(mut self, queue: ocl::Queue) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Appends options to the OpenCL C compiler's command line. Options that relax floating
    /// point (`-cl-fast-relaxed-math`, `-cl-mad-enable`) move results away from the reference.
    pub fn build_options(mut self, options: &str) -> Self {
        self.extra_options = options.to_string();
        self
    }

    /// Caps the tensors one multi-tensor launch takes (at least 1; default up to 16, as the
    /// device's kernel parameter size allows).
    pub fn max_tensors_per_launch(mut self, n: usize) -> Self {
        self.max_slots = Some(n.max(1));
        self
    }

    /// How many consecutive elements each work-item of a step takes (at least 1). The default
    /// is [`CPU_ELEMENTS_PER_ITEM`] on CPU devices, where a loop over them is what the device
    /// compiler vectorizes (PoCL runs a work-group as a loop over its work-items, which it does
    /// not vectorize through the step's branches), and 1 elsewhere, where neighbouring
    /// work-items must take neighbouring elements for coalesced access. Results are the same
    /// for every value.
    pub fn elements_per_item(mut self, n: usize) -> Self {
        self.per_item = Some(n.max(1));
        self
    }

    /// Whether gradient-norm partials accumulate in `double` where the device has
    /// `cl_khr_fp64` (the default). `false` takes the path of devices without it: each
    /// 4096-element chunk scaled by a power of two from its largest magnitude and summed in
    /// `float` (no finite input overflows; about 1e-6 relative error), for devices whose double
    /// precision is slow.
    pub fn f64_norms(mut self, on: bool) -> Self {
        self.no_fp64_norms = !on;
        self
    }

    /// Opens the device: a context and an in-order queue. Kernels are built on first use.
    pub fn build(self) -> Result<OpenCl, Error> {
        let list = devices()?;
        let Some(q) = self.queue.clone() else {
            let desc = self.select.pick(&list)?.clone();
            let context = core::create_context(None, &[desc.id], None, None)
                .map_err(|e| Error::cl("creating a context", e))?;
            let queue = core::create_command_queue(&context, desc.id, None)
                .map_err(|e| Error::cl("creating a queue", e))?;
            return OpenCl::open(desc, context, queue, &self);
        };
        let id = *q.device().as_core();
        let desc = match list.iter().find(|d| d.id == id) {
            Some(d) => d.clone(),
            None => {
                let pid = match core::get_device_info(id, core::DeviceInfo::Platform) {
                    Ok(core::DeviceInfoResult::Platform(p)) => p,
                    _ => {
                        return Err(Error::NotAvailable(
                            "the queue's platform is unknown".into(),
                        ))
                    }
                };
                describe(usize::MAX, usize::MAX, pid, id)
            }
        };
        let props = core::get_command_queue_info(q.as_core(), core::CommandQueueInfo::Properties);
        if let Ok(core::CommandQueueInfoResult::Properties(p)) = props {
            if p.contains(core::CommandQueueProperties::OUT_OF_ORDER_EXEC_MODE_ENABLE) {
                // Steps, norms and copies rely on the queue's order.
                return Err(Error::NotAvailable(
                    "an out-of-order queue (sage-opencl needs an in-order one)".into(),
                ));
            }
        }
        let context = q.context().as_core().clone();
        OpenCl::open(desc, context, q.as_core().clone(), &self)
    }
}

/// SAGE on one OpenCL device.
///
/// Buffers are [`ClBuffer`]s: device memory the caller owns (or wraps from its framework's
/// `ocl::Buffer`), stepped in place. Clones share the device, the queue and the compiled
/// programs; each clone keeps its own kernel objects, so clones may live on different threads.
///
/// It implements [`HostBuffers`] too (uploads and host copies), so checkpoints and the
/// conformance suite run on it without depending on this crate.
///
/// ```no_run
/// use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
/// use sage_opencl::OpenCl;
///
/// let cl = OpenCl::new()?;
/// let mut w = cl.upload(&[0.5f32, -0.25, 0.0])?;
/// let g = cl.upload(&[0.1f32, 0.2, 0.3])?;
/// let cfg = Config::reference(Algorithm::adamw(), 1e-3).beta0(0.8);
/// // m, v and Ī on the device, and the tensor's own step count.
/// let mut state = TensorState::try_new(cfg.state_layout(true), |_| cl.zeros::<f32>(3))?;
/// let mut opt = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()]).unwrap();
/// opt.step(&mut [ParamTensor::new(&mut w, &g, state.view())]).unwrap();
/// assert_eq!(state.step, 1);
/// println!("{:?}", cl.download(&w)?);
/// # Ok::<(), sage_opencl::Error>(())
/// ```
pub struct OpenCl {
    shared: Arc<Shared>,
    kernels: HashMap<(ProgramKey, &'static str), (Kernel, usize)>,
    /// Scratch for norm partials, reused across steps: the buffer and its size in bytes.
    partials: Option<(Mem, usize)>,
    /// The last few steps' and floors' launches, kept when every tensor of a call went into
    /// one packed launch ([`Kept`]), indexed by [`kept_index`], the most recent last.
    kept: [Vec<Kept>; 2],
    /// Unit tests: the multi-tensor launch (0-based) that fails as a driver error would.
    #[cfg(test)]
    fail_launch: Option<usize>,
    /// Unit tests: reading the non-finite counts back fails as a driver error would.
    #[cfg(test)]
    fail_read_back: bool,
}

impl Clone for OpenCl {
    fn clone(&self) -> Self {
        OpenCl {
            shared: self.shared.clone(),
            kernels: HashMap::new(),
            partials: None,
            kept: Default::default(),
            #[cfg(test)]
            fail_launch: None,
            #[cfg(test)]
            fail_read_back: false,
        }
    }
}

impl std::fmt::Debug for OpenCl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenCl({})", self.shared.desc)
    }
}

/// One tensor of a fused step, validated.
struct Item<'a> {
    /// Position in the caller's list of tensors, and its name, for errors.
    tensor: usize,
    name: Option<&'a str>,
    k: &'a Coeffs,
    len: usize,
    p: Buf<'a>,
    g: Buf<'a>,
    m: Option<Buf<'a>>,
    v: Option<Buf<'a>>,
    b: Option<Buf<'a>>,
}

/// One non-empty buffer of a step: its memory object and where that lives.
#[derive(Clone, Copy)]
struct Buf<'a> {
    mem: &'a Mem,
    place: &'a Place,
}

impl<'a> Buf<'a> {
    fn of<E: Element>(b: &'a ClBuffer<E>) -> Self {
        Buf {
            mem: mem_of(b),
            place: b.place.as_ref().expect("non-empty ClBuffer has a place"),
        }
    }
}

impl<'a> Item<'a> {
    /// The buffers in kernel-argument order (param, grad, m, v, ibar).
    fn bufs(&self) -> [Option<Buf<'a>>; 5] {
        [Some(self.p), Some(self.g), self.m, self.v, self.b]
    }

    /// The memory objects at the roots (`None` when absent).
    fn roots(&self) -> [Option<&'a Mem>; 5] {
        self.bufs().map(|b| b.map(|b| &b.place.root))
    }
}

/// Where a step's items live, for packing launches (from [`OpenCl::check_items`]).
struct Placements {
    /// Per item, the memory objects at the roots as addresses (0 when absent): tensors with
    /// equal keys can share a packed launch. `None` when a buffer's offset is not a whole
    /// number of elements, which a kernel cannot address from its root.
    keys: Vec<Option<[usize; 5]>>,
    /// Per item, each buffer's offset in elements (0 when absent or not whole).
    offsets: Vec<[u64; 5]>,
}

/// Bytes per element of each buffer position (param, grad, m, v, ibar).
fn sizes(psize: usize, ssize: usize) -> [usize; 5] {
    [psize, psize, ssize, ssize, ssize]
}

/// Where reused launches are counted in `Shared::launches` (they also count as packed steps).
const REUSED: usize = 4;

/// Where a launch is counted in `Shared::launches`.
fn launch_index(norm: bool, packed: bool) -> usize {
    2 * usize::from(norm) + usize::from(!packed)
}

/// Fewest consecutive tensors sharing their root buffers that take a packed launch.
const MIN_PACKED: usize = 2;

/// Multi-tensor launches enqueued on a device ([`OpenCl::launch_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchCounts {
    /// Packed fused steps and floors: any number of tensors cut from the same buffers.
    pub packed_steps: u64,
    /// Fused steps and floors with each tensor's own buffers.
    pub steps: u64,
    /// Packed gradient-norm (and read-floor) passes.
    pub packed_norms: u64,
    /// Gradient-norm passes with each buffer its own argument.
    pub norms: u64,
    /// Of the packed steps and floors, those that reused the tables of the last one over the
    /// same layout, uploading only their coefficients.
    pub reused: u64,
}

/// One launch of a step: `count` items from `first`; packed (one set of root buffers, the
/// tensors at offsets) or with each tensor's own buffers.
struct Launch {
    first: usize,
    count: usize,
    packed: bool,
    groups: usize,
}

/// The launches of `keys.len()` items, in item order (so that a failure part-way leaves a
/// prefix done, and partials come back in item order): runs of at least [`MIN_PACKED`]
/// consecutive items with the same key (`None`: cannot be packed) go packed, the others up to
/// `per` at a time.
fn plan_launches<K: PartialEq>(keys: &[Option<K>], per: usize) -> Vec<Launch> {
    let mut launches: Vec<Launch> = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let run = match &keys[i] {
            Some(k) => keys[i..]
                .iter()
                .take_while(|o| o.as_ref() == Some(k))
                .count(),
            None => 1,
        };
        if run >= MIN_PACKED {
            launches.push(Launch {
                first: i,
                count: run,
                packed: true,
                groups: 0,
            });
            i += run;
            continue;
        }
        match launches.last_mut() {
            Some(l) if !l.packed && l.count < per && l.first + l.count == i => l.count += 1,
            _ => launches.push(Launch {
                first: i,
                count: 1,
                packed: false,
                groups: 0,
            }),
        }
        i += 1;
    }
    launches
}

/// Chunks `first .. first + chunks` of one buffer on the norm grid.
struct NormItem<'a> {
    /// `None` only for an empty buffer.
    mem: Option<&'a Mem>,
    /// Where it lives, and its offset in elements there when a whole number of them.
    place: Option<(&'a Place, Option<u64>)>,
    len: usize,
    first: usize,
    chunks: usize,
}

impl<'a> NormItem<'a> {
    fn whole<E: Element>(b: &'a ClBuffer<E>) -> Self {
        Self::window(b, 0, norm::chunk_count(b.len))
    }

    fn window<E: Element>(b: &'a ClBuffer<E>, first: usize, chunks: usize) -> Self {
        let size = E::DTYPE.size();
        NormItem {
            mem: b.mem.as_ref(),
            place: b.place.as_ref().map(|p| (p, p.elements(size))),
            len: b.len,
            first,
            chunks,
        }
    }

    /// The root's address when this buffer can share a packed launch.
    fn root(&self) -> Option<usize> {
        match self.place {
            Some((p, Some(_))) => Some(p.root.as_ptr() as usize),
            _ => None,
        }
    }
}

fn check_len(buffer: &'static str, expected: usize, got: usize) -> Result<(), Error> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            buffer,
            expected,
            got,
        })
    }
}

/// The memory object of a buffer that has `len > 0` elements.
fn mem_of<E: Element>(b: &ClBuffer<E>) -> &Mem {
    b.mem
        .as_ref()
        .expect("non-empty ClBuffer has a memory object")
}

/// Validates one tensor's lengths; `None` when it is empty (nothing to do). Contexts and
/// aliasing are checked over a whole launch list ([`OpenCl::check_items`]).
fn item<'a, P: Element, S: Element>(
    (tensor, name): (usize, Option<&'a str>),
    k: &'a Coeffs,
    param: &'a ClBuffer<P>,
    grad: &'a ClBuffer<P>,
    m: Option<&'a ClBuffer<S>>,
    v: Option<&'a ClBuffer<S>>,
    b: Option<&'a ClBuffer<S>>,
) -> Result<Option<Item<'a>>, Error> {
    let n = param.len;
    check_len("grad", n, grad.len)?;
    for (name, s) in [("m", m), ("v", v), ("ibar", b)] {
        if let Some(s) = s {
            check_len(name, n, s.len)?;
        }
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Item {
        tensor,
        name,
        k,
        len: n,
        p: Buf::of(param),
        g: Buf::of(grad),
        m: m.map(Buf::of),
        v: v.map(Buf::of),
        b: b.map(Buf::of),
    }))
}

/// The items of a step's non-empty tensors, each with the coefficients `k` gives it. The
/// kernels write through the memory objects, so shared borrows of the tensors are enough: no
/// per-tensor copy of anything.
fn items<'a, P: Element, S: Element>(
    tensors: &'a [ParamTensor<'_, OpenCl, P, S>],
    k: impl Fn(&'a ParamTensor<'_, OpenCl, P, S>) -> &'a Coeffs,
) -> Result<Vec<Item<'a>>, Error> {
    let mut items = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let (m, v, b) = t.state();
        if let Some(it) = item((i, t.name_str()), k(t), t.param(), t.grad(), m, v, b)? {
            items.push(it);
        }
    }
    Ok(items)
}

/// A launch table on the device: its slots and its coefficients.
struct DeviceTable {
    slots: Mem,
    coeffs: Mem,
}

/// Sets a step kernel's leading arguments (`SAGE_CL_TABLE_ARGS`): the slots, the
/// coefficients, and `base`, the launch's first tensor in the slots. Returns the next
/// argument's index.
fn set_table(k: &Kernel, slots: &Mem, coeffs: &Mem, base: u32) -> Result<u32, Error> {
    let set = |i: u32, a: ArgVal| {
        core::set_kernel_arg(k, i, a).map_err(|e| Error::cl("setting a kernel argument", e))
    };
    set(0, ArgVal::mem(slots))?;
    set(1, ArgVal::mem(coeffs))?;
    set(2, ArgVal::scalar(&base))?;
    Ok(3)
}

/// Launches kept per kernel: a step whose tensors come in a few calls (slices of different
/// storage types, say) keeps one for each.
const KEPT_PER_KERNEL: usize = 4;

/// Where the launch of the multi-tensor kernel `name` is kept in `OpenCl::kept`.
fn kept_index(name: &str) -> usize {
    usize::from(name != "sage_cl_step")
}

/// The packed form of the multi-tensor kernel `name`.
fn packed_name(name: &str) -> &'static str {
    match name {
        "sage_cl_step" => "sage_cl_step_packed",
        _ => "sage_cl_floor_packed",
    }
}

/// Sets a packed launch's arguments after its table's (from index `a`): its tensor count, the
/// step's non-finite counters (`None`: not counted), each work-group's slot, and the five
/// root buffers its tensors are cut from.
fn set_packed(
    k: &Kernel,
    a: u32,
    count: usize,
    bad: Option<&Mem>,
    group_slot: &Mem,
    roots: [Option<&Mem>; 5],
) -> Result<(), Error> {
    let set = |i: u32, v: ArgVal| {
        core::set_kernel_arg(k, i, v).map_err(|e| Error::cl("setting a kernel argument", e))
    };
    set(a, ArgVal::scalar(&(count as u32)))?;
    set(a + 1, opt_mem(bad))?;
    set(a + 2, ArgVal::mem(group_slot))?;
    for (j, r) in roots.into_iter().enumerate() {
        set(a + 3 + j as u32, opt_mem(r))?;
    }
    Ok(())
}

/// A buffer argument, or NULL for an absent state buffer.
fn opt_mem(m: Option<&Mem>) -> ArgVal<'_> {
    m.map_or_else(ArgVal::mem_null, ArgVal::mem)
}

impl OpenCl {
    /// The default device ([`Select::Default`]), or the one `SAGE_OPENCL_DEVICE` names
    /// (`P:D` indices or part of a name).
    pub fn new() -> Result<Self, Error> {
        let select = std::env::var("SAGE_OPENCL_DEVICE")
            .map(|s| Select::parse(&s))
            .unwrap_or_default();
        Self::builder().device(select).build()
    }

    /// A backend on the device `select` chooses.
    pub fn with_device(select: Select) -> Result<Self, Error> {
        Self::builder().device(select).build()
    }

    /// Options for opening a backend.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn open(
        desc: DeviceDesc,
        context: Context,
        queue: CommandQueue,
        b: &Builder,
    ) -> Result<Self, Error> {
        let (extra, max_slots) = (&b.extra_options, b.max_slots);
        let per_item = b.per_item.unwrap_or(if desc.kind == "CPU" {
            CPU_ELEMENTS_PER_ITEM
        } else {
            1
        });
        let mut options = String::new();
        if desc.correctly_rounded_div_sqrt {
            // Matches the CPU's IEEE division and square root (OpenCL allows 2.5 and 3 ulp).
            options.push_str("-cl-fp32-correctly-rounded-divide-sqrt ");
        }
        options.push_str(extra);
        let options = CString::new(options)
            .map_err(|_| Error::NotAvailable("build options contain a NUL byte".into()))?;
        // Kernel arguments: 2 tables, 2 scalars, the counters and 5 pointers per tensor,
        // 8 bytes each at most.
        let fit = desc.max_parameter_size.saturating_sub(5 * 8) / (5 * 8);
        let slots = fit.clamp(1, max_slots.unwrap_or(MAX_SLOTS).min(MAX_SLOTS));
        let max_alloc = match core::get_device_info(desc.id, core::DeviceInfo::MaxMemAllocSize) {
            Ok(core::DeviceInfoResult::MaxMemAllocSize(n)) => n,
            _ => u64::MAX,
        };
        let align = match core::get_device_info(desc.id, core::DeviceInfo::MemBaseAddrAlign) {
            Ok(core::DeviceInfoResult::MemBaseAddrAlign(bits)) => (bits as usize / 8).max(1),
            _ => 4096,
        };
        Ok(OpenCl {
            shared: Arc::new(Shared {
                align,
                launches: Default::default(),
                context,
                queue,
                options,
                slots,
                per_item,
                norm_fp64: desc.fp64 && !b.no_fp64_norms,
                desc,
                max_alloc,
                programs: Mutex::new(HashMap::new()),
            }),
            kernels: HashMap::new(),
            partials: None,
            kept: Default::default(),
            #[cfg(test)]
            fail_launch: None,
            #[cfg(test)]
            fail_read_back: false,
        })
    }

    /// This backend's context as an address (what a buffer's place records).
    fn context_addr(&self) -> usize {
        self.shared.context.as_ptr() as usize
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &DeviceDesc {
        &self.shared.desc
    }

    /// The OpenCL context (to create buffers with other OpenCL code).
    pub fn context(&self) -> &Context {
        &self.shared.context
    }

    /// The in-order queue every operation of this backend (and its clones) goes through.
    pub fn queue(&self) -> &CommandQueue {
        &self.shared.queue
    }

    /// Tensors one multi-tensor launch takes on this device.
    pub fn tensors_per_launch(&self) -> usize {
        self.shared.slots
    }

    /// Multi-tensor launches enqueued on this device so far, by every clone. Packed launches
    /// take any number of tensors cut from the same buffers ([`slab`](Self::slab)); unpacked
    /// ones take up to [`tensors_per_launch`](Self::tensors_per_launch) tensors with buffers
    /// of their own. A way to check that a model's layout packs.
    pub fn launch_counts(&self) -> LaunchCounts {
        let n =
            |norm, packed| self.shared.launches[launch_index(norm, packed)].load(Ordering::Relaxed);
        LaunchCounts {
            packed_steps: n(false, true),
            steps: n(false, false),
            packed_norms: n(true, true),
            norms: n(true, false),
            reused: self.shared.launches[REUSED].load(Ordering::Relaxed),
        }
    }

    fn count_launch(&self, norm: bool, packed: bool) {
        self.shared.launches[launch_index(norm, packed)].fetch_add(1, Ordering::Relaxed);
    }

    /// Consecutive elements each work-item of a step takes ([`Builder::elements_per_item`]).
    pub fn elements_per_item(&self) -> usize {
        self.shared.per_item
    }

    /// Waits until every queued operation has finished.
    pub fn finish(&self) -> Result<(), Error> {
        core::finish(&self.shared.queue).map_err(|e| Error::cl("waiting for the queue", e))
    }

    /// Builds the kernels of parameter storage `P` and state storage `S` now rather than at
    /// the first step (a build takes from milliseconds to seconds).
    pub fn prepare<P: Element, S: Element>(&mut self) -> Result<(), Error> {
        self.kernel(ProgramKey::Step(P::DTYPE, S::DTYPE), "sage_cl_step")?;
        self.kernel(ProgramKey::Norm(P::DTYPE), "sage_cl_norm_partials")?;
        Ok(())
    }

    fn mem(&self, len: usize, size: usize, init: Option<&[u8]>) -> Result<Option<Mem>, Error> {
        if len == 0 {
            return Ok(None);
        }
        let n = len
            .checked_mul(size)
            .filter(|&n| n as u64 <= self.shared.max_alloc)
            .ok_or_else(|| {
                Error::TooLarge(format!(
                    "{len} elements of {size} bytes exceed the device's largest allocation ({} bytes)",
                    self.shared.max_alloc
                ))
            })?;
        let flags = match init {
            Some(_) => MemFlags::new().read_write().copy_host_ptr(),
            None => MemFlags::new().read_write(),
        };
        // SAFETY: with COPY_HOST_PTR the data is copied before create_buffer returns; without
        // it no host pointer is passed.
        let mem = unsafe { core::create_buffer(&self.shared.context, flags, n, init) }
            .map_err(|e| Error::cl("allocating a buffer", e))?;
        Ok(Some(mem))
    }

    /// A new device buffer holding a copy of `data`.
    pub fn upload<E: Element>(&self, data: &[E]) -> Result<ClBuffer<E>, Error> {
        let mem = self.mem(data.len(), E::DTYPE.size(), Some(bytes(data)))?;
        Ok(ClBuffer::own(mem, data.len(), self.context_addr()))
    }

    /// A new device buffer of `len` zeros (what fresh optimizer state holds).
    pub fn zeros<E: Element>(&self, len: usize) -> Result<ClBuffer<E>, Error> {
        let mem = self.mem(len, E::DTYPE.size(), None)?;
        let mut buf = ClBuffer::own(mem, len, self.context_addr());
        if let Some(m) = &buf.mem {
            let filled = core::enqueue_fill_buffer(
                &self.shared.queue,
                m,
                0u8,
                0,
                len * E::DTYPE.size(),
                None::<()>,
                None::<()>,
                None,
            );
            if filled.is_err() {
                // OpenCL 1.1 has no fill: write zeros from the host.
                self.write(&mut buf, &vec![E::default(); len])?;
            }
        }
        Ok(buf)
    }

    /// Bytes a sub-buffer's start must be a multiple of on this device
    /// (`CL_DEVICE_MEM_BASE_ADDR_ALIGN`; 128 on PoCL, 512 or more on many GPUs).
    pub fn sub_buffer_alignment(&self) -> usize {
        self.shared.align
    }

    /// Elements `offset .. offset + len` of `parent` as a buffer of their own: an OpenCL
    /// sub-buffer, the same device memory (no copy). Tensors whose parameter, gradient and
    /// state buffers are each cut from one parent per stream (as frameworks with flat
    /// parameter and gradient buffers have them) step in one packed launch however many they
    /// are: see [`slab`](Self::slab). An error, before anything is made, when the region runs
    /// past the parent or starts off [`sub_buffer_alignment`](Self::sub_buffer_alignment).
    pub fn sub_buffer<E: Element>(
        &self,
        parent: &ClBuffer<E>,
        offset: usize,
        len: usize,
    ) -> Result<ClBuffer<E>, Error> {
        let size = E::DTYPE.size();
        let end = offset.checked_add(len).filter(|&e| e <= parent.len);
        if end.is_none() {
            return Err(Error::Region(format!(
                "elements {offset}..{offset}+{len} of a buffer of {}",
                parent.len
            )));
        }
        if len == 0 {
            return Ok(ClBuffer::own(None, 0, self.context_addr()));
        }
        if !(offset * size).is_multiple_of(self.shared.align) {
            return Err(Error::Region(format!(
                "element {offset} of {} starts at byte {}, not a multiple of the device's \
                 {}-byte base-address alignment",
                E::DTYPE,
                offset * size,
                self.shared.align
            )));
        }
        let root = parent
            .place
            .as_ref()
            .expect("non-empty ClBuffer has a place");
        if root.offset != 0 || root.root.as_ptr() != mem_of(parent).as_ptr() {
            // OpenCL makes no sub-buffer of a sub-buffer.
            return Err(Error::Region(
                "the parent is itself a sub-buffer: cut from its own parent instead".into(),
            ));
        }
        let region = core::BufferRegion::<u8>::new(offset * size, len * size);
        let mem = core::create_sub_buffer(mem_of(parent), MemFlags::new().read_write(), &region)
            .map_err(|e| Error::cl("creating a sub-buffer", e))?;
        let place = crate::buffer::Place {
            root: mem_of(parent).clone(),
            offset: offset * size,
            context: root.context,
        };
        Ok(ClBuffer::sub(mem, len, place))
    }

    /// One zeroed allocation holding buffers of `lens` elements, each a sub-buffer starting on
    /// the device's alignment: returns the parent and the pieces. Cut every stream of a model
    /// this way (parameters, gradients, each state buffer) and a step packs all its tensors
    /// into one launch per kind of kernel, where buffers of their own take one launch per
    /// [`tensors_per_launch`](Self::tensors_per_launch).
    ///
    /// ```no_run
    /// # use sage_opencl::OpenCl;
    /// let cl = OpenCl::new()?;
    /// let (_params, pieces) = cl.slab::<f32>(&[768, 3072, 768])?;
    /// assert_eq!(pieces[1].len(), 3072);
    /// # Ok::<(), sage_opencl::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn slab<E: Element>(
        &self,
        lens: &[usize],
    ) -> Result<(ClBuffer<E>, Vec<ClBuffer<E>>), Error> {
        let size = E::DTYPE.size();
        // Elements per alignment unit (the alignment is a power of two, element sizes too).
        let unit = (self.shared.align / size).max(1);
        let mut starts = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &n in lens {
            starts.push(at);
            at = at
                .checked_add(n.div_ceil(unit) * unit)
                .ok_or_else(|| Error::TooLarge(format!("a slab past {at} elements")))?;
        }
        let parent = self.zeros::<E>(at)?;
        let pieces = starts
            .iter()
            .zip(lens)
            .map(|(&s, &n)| self.sub_buffer(&parent, s, n))
            .collect::<Result<_, _>>()?;
        Ok((parent, pieces))
    }

    /// Copies `data` into `buf` (same length), after every operation queued before.
    pub fn write<E: Element>(&self, buf: &mut ClBuffer<E>, data: &[E]) -> Result<(), Error> {
        check_len("host slice", buf.len, data.len())?;
        if let Some(m) = &buf.mem {
            // SAFETY: blocking write: `data` outlives the copy.
            unsafe {
                core::enqueue_write_buffer(
                    &self.shared.queue,
                    m,
                    true,
                    0,
                    bytes(data),
                    None::<()>,
                    None::<()>,
                )
            }
            .map_err(|e| Error::cl("writing a buffer", e))?;
        }
        Ok(())
    }

    /// Copies `buf` into `out` (same length), after every operation queued before.
    pub fn read<E: Element>(&self, buf: &ClBuffer<E>, out: &mut [E]) -> Result<(), Error> {
        check_len("host slice", buf.len, out.len())?;
        if let Some(m) = &buf.mem {
            // SAFETY: blocking read: `out` outlives the copy.
            unsafe {
                core::enqueue_read_buffer(
                    &self.shared.queue,
                    m,
                    true,
                    0,
                    bytes_mut(out),
                    None::<()>,
                    None::<()>,
                )
            }
            .map_err(|e| Error::cl("reading a buffer", e))?;
        }
        Ok(())
    }

    /// The contents of `buf`, after every operation queued before.
    pub fn download<E: Element>(&self, buf: &ClBuffer<E>) -> Result<Vec<E>, Error> {
        let mut out = vec![E::default(); buf.len];
        self.read(buf, &mut out)?;
        Ok(out)
    }

    fn program(&self, key: ProgramKey) -> Result<Program, Error> {
        let sh = &self.shared;
        let mut programs = sh.programs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = programs.get(&key) {
            return Ok(p.clone());
        }
        let src = match key {
            ProgramKey::Step(p, s) => source::step_program(p, s, sh.slots, sh.per_item),
            ProgramKey::Norm(e) => source::norm_program(e, sh.slots, sh.norm_fp64, sh.per_item > 1),
        };
        let src = CString::new(src).expect("generated source has no NUL");
        let program = core::create_program_with_source(&sh.context, &[src])
            .map_err(|e| Error::cl("creating a program", e))?;
        if let Err(e) = core::build_program(&program, Some(&[sh.desc.id]), &sh.options, None, None)
        {
            let log = match core::get_program_build_info(
                &program,
                sh.desc.id,
                ProgramBuildInfo::BuildLog,
            ) {
                Ok(ProgramBuildInfoResult::BuildLog(l)) if !l.trim().is_empty() => l,
                _ => e.to_string(),
            };
            return Err(Error::Build {
                program: key.name(),
                log,
            });
        }
        programs.insert(key, program.clone());
        Ok(program)
    }

    /// Kernel `name` of program `key` and the work-group size to launch it with.
    fn kernel(&mut self, key: ProgramKey, name: &'static str) -> Result<(Kernel, usize), Error> {
        if let Some(k) = self.kernels.get(&(key, name)) {
            return Ok(k.clone());
        }
        let program = self.program(key)?;
        let k =
            core::create_kernel(&program, name).map_err(|e| Error::cl("creating a kernel", e))?;
        let max = match core::get_kernel_work_group_info(
            &k,
            self.shared.desc.id,
            KernelWorkGroupInfo::WorkGroupSize,
        ) {
            Ok(KernelWorkGroupInfoResult::WorkGroupSize(n)) if n > 0 => n,
            _ => 1,
        };
        // CPU devices run a work-group as a loop over its work-items, each taking a run of
        // elements: a few of them per group, so that a small tensor fills its group.
        let local = if self.shared.per_item > 1 {
            CPU_LOCAL
        } else {
            LOCAL
        };
        let mut wg = max.min(local);
        if name.starts_with("sage_cl_norm_partials") || name.starts_with("sage_cl_read_floor") {
            wg = if self.shared.per_item > 1 {
                // One work-item per chunk: a work-group of a few chunks is enough.
                wg.min(NORM_CPU_LOCAL)
            } else {
                // The tree reduction halves: a power of two (so it also divides the chunk).
                1 << (usize::BITS - 1 - wg.leading_zeros())
            };
        }
        self.kernels.insert((key, name), (k.clone(), wg));
        Ok((k, wg))
    }

    /// A read-only buffer holding `data`, for per-launch tables.
    fn table(&self, data: &[u8]) -> Result<Mem, Error> {
        // SAFETY: COPY_HOST_PTR copies `data` before returning.
        unsafe {
            core::create_buffer(
                &self.shared.context,
                MemFlags::new().read_only().copy_host_ptr(),
                data.len(),
                Some(data),
            )
        }
        .map_err(|e| Error::cl("uploading a launch table", e))
    }

    fn enqueue(&self, k: &Kernel, groups: usize, wg: usize) -> Result<(), Error> {
        let gws = groups
            .checked_mul(wg)
            .ok_or_else(|| Error::TooLarge(format!("{groups} work-groups")))?;
        // SAFETY: every argument was set and every buffer is at least as long as the
        // lengths in the launch table, which the kernels check each index against.
        unsafe {
            core::enqueue_kernel(
                &self.shared.queue,
                k,
                1,
                None,
                &[gws, 1, 1],
                Some([wg, 1, 1]),
                None::<()>,
                None::<()>,
            )
        }
        .map_err(|e| Error::cl("launching a kernel", e))
    }

    /// Multi-tensor kernel `name` (the fused step or its floor) over `items` (the non-empty
    /// ones of `tensors` tensors), `slots` tensors per launch.
    ///
    /// Everything that can be checked is checked before the first launch: lengths (by
    /// [`item`]), every buffer's context and that no buffer the step writes is also another
    /// buffer of the step ([`check_items`](Self::check_items)), the launch table, the work
    /// sizes, the kernel's build. A failure after the first launch (a driver error setting an
    /// argument or enqueuing a later launch) is [`Error::Partial`]: the tensors of the
    /// launches already enqueued were stepped, the others not.
    ///
    /// With `count`, each item's count of non-finite stored parameters (the kernel's counters,
    /// read once every launch was enqueued: the read waits for them) is returned in item order;
    /// a failure of that read is [`Error::Partial`] with every tensor applied (the launches
    /// were enqueued and may have run).
    fn step_items<P: Element, S: Element>(
        &mut self,
        items: &[Item<'_>],
        tensors: usize,
        name: &'static str,
        count: bool,
    ) -> Result<Vec<u64>, Error> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (psize, ssize) = (P::DTYPE.size(), S::DTYPE.size());
        let Placements { keys, offsets } = self.check_items(items, psize, ssize)?;
        let per = self.shared.slots;
        if items.len() > u32::MAX as usize {
            return Err(Error::TooLarge(format!(
                "{} tensors in one step",
                items.len()
            )));
        }
        let mut launches = plan_launches(&keys, per);
        let key = ProgramKey::Step(P::DTYPE, S::DTYPE);
        let (k, mut wg) = self.kernel(key, name)?;
        let packed_kernel = if launches.iter().any(|l| l.packed) {
            let (pk, pwg) = self.kernel(key, packed_name(name))?;
            // One work-group size for both, so that the table's group counts fit either.
            wg = wg.min(pwg);
            Some(pk)
        } else {
            None
        };
        // Elements per work-group: the work-group size times each work-item's run.
        let span = wg
            .checked_mul(self.shared.per_item)
            .ok_or_else(|| Error::TooLarge(format!("{} elements per work-item", wg)))?;
        let mut table = Table::with_capacity(items.len());
        for l in &mut launches {
            let mut end = 0u64;
            for (it, off) in items[l.first..l.first + l.count]
                .iter()
                .zip(&offsets[l.first..])
            {
                end += it.len.div_ceil(span) as u64;
                let k = table.coeffs_index(it.k);
                table.slots.push(Slot {
                    len: it.len as u64,
                    end_group: end,
                    present: present(it.m.is_some(), it.v.is_some(), it.b.is_some()),
                    k,
                    off: *off,
                });
            }
            l.groups = usize::try_from(end)
                .ok()
                .filter(|g| g.checked_mul(wg).is_some())
                .ok_or_else(|| Error::TooLarge(format!("{end} work-groups in one launch")))?;
        }
        let slots = &table.slots;
        let table = self.upload_table(&table)?;
        let counters = self.counters(count, items.len())?;
        let mut group_slot = None;
        for (li, l) in launches.iter().enumerate() {
            let chunk = &items[l.first..l.first + l.count];
            self.count_launch(false, l.packed);
            let launched =
                self.injected_failure(li)
                    .and_then(|()| match (&packed_kernel, l.packed) {
                        (Some(pk), true) => self
                            .launch_packed(
                                pk,
                                &table,
                                &slots[l.first..l.first + l.count],
                                counters.as_ref(),
                                l,
                                &items[l.first],
                                wg,
                            )
                            .map(|g| group_slot = Some(g)),
                        _ => self.launch_chunk(
                            &k,
                            &table,
                            counters.as_ref(),
                            l.first as u32,
                            chunk,
                            l.groups,
                            wg,
                        ),
                    });
            if let Err(cause) = launched {
                return Err(if li == 0 {
                    // Nothing was enqueued: nothing changed.
                    cause
                } else {
                    Error::Partial {
                        applied: chunk[0].tensor,
                        tensors,
                        cause: Box::new(cause),
                    }
                });
            }
        }
        // One packed launch over every tensor of the step: kept for the next step.
        if let ([l], Some(group_slot), Some(roots)) = (&launches[..], group_slot, keys[0]) {
            if l.packed && l.count == tensors {
                let kept = items.iter().zip(slots).map(|(it, sl)| {
                    let mut at = [0; 5];
                    for (j, b) in it.bufs().into_iter().enumerate() {
                        at[j] = b.map_or(0, |b| b.place.offset);
                    }
                    (it.len, at, sl.k)
                });
                let kept = Kept::new(
                    (P::DTYPE, S::DTYPE),
                    roots,
                    kept,
                    table.slots,
                    group_slot,
                    l.groups,
                    wg,
                );
                let all = &mut self.kept[kept_index(name)];
                if all.len() == KEPT_PER_KERNEL {
                    all.remove(0);
                }
                all.push(kept);
            }
        }
        self.read_back(counters, items.len(), tensors)
    }

    /// A step's non-finite counters for `n` items, when `count`: two zeroed words per item
    /// (low and high halves of its count), written by the kernel.
    fn counters(&self, count: bool, n: usize) -> Result<Option<Mem>, Error> {
        if count {
            self.mem(2 * n, 4, Some(&vec![0u8; 8 * n]))
        } else {
            Ok(None)
        }
    }

    /// The counts of `n` items from the step's counters (`None`: not counted, no counts).
    /// Every launch is enqueued: a failure from here on is after the update (or while it
    /// ran), so it is a partial step of all `tensors`, never an error inviting a retry.
    fn read_back(
        &self,
        counters: Option<Mem>,
        n: usize,
        tensors: usize,
    ) -> Result<Vec<u64>, Error> {
        let Some(counters) = counters else {
            return Ok(Vec::new());
        };
        let mut words = vec![0u32; 2 * n];
        let read = self.read_counts(&counters, &mut words);
        if let Err(cause) = read {
            return Err(Error::Partial {
                applied: tensors,
                tensors,
                cause: Box::new(cause),
            });
        }
        Ok(words
            .chunks_exact(2)
            .map(|w| u64::from(w[0]) | u64::from(w[1]) << 32)
            .collect())
    }

    /// The multi-tensor kernel `name` over `tensors` (each with the coefficients `k` gives
    /// it) through the kept launch, when they are laid out as it was ([`Kept::matches`]);
    /// `None` otherwise. With `count`, the tensors' non-finite counts, as
    /// [`step_items`](Self::step_items) returns them.
    fn step_kept<'a, P: Element, S: Element>(
        &mut self,
        tensors: &'a [ParamTensor<'_, OpenCl, P, S>],
        name: &'static str,
        count: bool,
        k: impl Fn(&'a ParamTensor<'_, OpenCl, P, S>) -> &'a Coeffs,
    ) -> Option<Result<Vec<u64>, Error>> {
        let i = kept_index(name);
        let mut all = std::mem::take(&mut self.kept[i]);
        let context = self.context_addr();
        // Most recent first; a launch of other tensors fails at its first tensor.
        let found = all
            .iter()
            .enumerate()
            .rev()
            .find_map(|(at, kept)| kept.matches(context, tensors, &k).map(|table| (at, table)));
        let ran = found.map(|(at, table)| {
            let kept = all.remove(at);
            let ran = self.launch_kept(&kept, &table, tensors, name, count);
            all.push(kept);
            ran
        });
        self.kept[i] = all;
        ran
    }

    /// Launches `kept` with this step's coefficients (`table`) over `tensors`.
    fn launch_kept<P: Element, S: Element>(
        &mut self,
        kept: &Kept,
        table: &Table,
        tensors: &[ParamTensor<'_, OpenCl, P, S>],
        name: &'static str,
        count: bool,
    ) -> Result<Vec<u64>, Error> {
        let n = tensors.len();
        let (k, _) = self.kernel(ProgramKey::Step(P::DTYPE, S::DTYPE), packed_name(name))?;
        let coeffs = self.table(table.coeff_bytes())?;
        let counters = self.counters(count, n)?;
        self.count_launch(false, true);
        self.shared.launches[REUSED].fetch_add(1, Ordering::Relaxed);
        self.injected_failure(0)?;
        let a = set_table(&k, &kept.slots, &coeffs, 0)?;
        let roots = Kept::roots_of(&tensors[0]);
        set_packed(&k, a, n, counters.as_ref(), &kept.group_slot, roots)?;
        self.enqueue(&k, kept.groups, kept.wg)?;
        self.read_back(counters, n, n)
    }

    /// Unit tests: launch `li` of a step fails as a driver error would.
    fn injected_failure(&self, li: usize) -> Result<(), Error> {
        #[cfg(test)]
        if self.fail_launch == Some(li) {
            return Err(Error::Cl {
                op: "launching a kernel",
                status: Some(ocl::core::Status::CL_OUT_OF_RESOURCES as i32),
                message: "injected by a test".into(),
            });
        }
        let _ = li;
        Ok(())
    }

    /// Reads the step's non-finite counters (waits for the launches).
    fn read_counts(&self, counters: &Mem, words: &mut [u32]) -> Result<(), Error> {
        #[cfg(test)]
        if self.fail_read_back {
            return Err(Error::Cl {
                op: "reading the non-finite counts",
                status: Some(ocl::core::Status::CL_OUT_OF_RESOURCES as i32),
                message: "injected by a test".into(),
            });
        }
        self.read_raw(counters, words, "reading the non-finite counts")
    }

    /// Sets the arguments of one packed launch (the tensors' shared root buffers, once) and
    /// enqueues it; returns its table of each work-group's slot.
    #[allow(clippy::too_many_arguments)]
    fn launch_packed(
        &self,
        k: &Kernel,
        table: &DeviceTable,
        slots: &[Slot],
        bad: Option<&Mem>,
        l: &Launch,
        first: &Item<'_>,
        wg: usize,
    ) -> Result<Mem, Error> {
        // Each work-group's slot in the launch, from the table's running group counts.
        let mut group_slot = Vec::with_capacity(l.groups);
        for (i, sl) in slots.iter().enumerate() {
            group_slot.resize(sl.end_group as usize, i as u32);
        }
        let group_slot = self.table(u32_bytes(&group_slot))?;
        let a = set_table(k, &table.slots, &table.coeffs, l.first as u32)?;
        set_packed(k, a, l.count, bad, &group_slot, first.roots())?;
        self.enqueue(k, l.groups, wg)?;
        Ok(group_slot)
    }

    /// Sets the arguments of one multi-tensor launch and enqueues it. `bad`: the step's
    /// non-finite counters, or `None` (a null argument: not counted).
    #[allow(clippy::too_many_arguments)]
    fn launch_chunk(
        &self,
        k: &Kernel,
        table: &DeviceTable,
        bad: Option<&Mem>,
        base: u32,
        chunk: &[Item<'_>],
        groups: usize,
        wg: usize,
    ) -> Result<(), Error> {
        let set = |i: u32, a: ArgVal| {
            core::set_kernel_arg(k, i, a).map_err(|e| Error::cl("setting a kernel argument", e))
        };
        let count = chunk.len() as u32;
        let first = set_table(k, &table.slots, &table.coeffs, base)?;
        set(first, ArgVal::scalar(&count))?;
        set(first + 1, opt_mem(bad))?;
        for s in 0..self.shared.slots {
            let a = first + 2 + 5 * s as u32;
            match chunk.get(s) {
                Some(it) => {
                    set(a, ArgVal::mem(it.p.mem))?;
                    set(a + 1, ArgVal::mem(it.g.mem))?;
                    set(a + 2, opt_mem(it.m.map(|b| b.mem)))?;
                    set(a + 3, opt_mem(it.v.map(|b| b.mem)))?;
                    set(a + 4, opt_mem(it.b.map(|b| b.mem)))?;
                }
                None => {
                    for j in 0..5 {
                        set(a + j, ArgVal::mem_null())?;
                    }
                }
            }
        }
        self.enqueue(k, groups, wg)
    }

    /// Checks every buffer of `items` before anything is launched: it belongs to this
    /// backend's context ([`Error::ForeignBuffer`]), and no buffer the step writes (θ, `m`,
    /// `v`, `ibar`) shares memory with any other buffer of the step — the same memory object
    /// (a [`ClBuffer`] clone), or overlapping sub-buffers of one ([`Error::Aliased`]). Two
    /// tensors may share a gradient (it is only read). `psize`/`ssize`: bytes per parameter
    /// and state element. Returns where the items live, read in the same pass.
    fn check_items<'a>(
        &self,
        items: &[Item<'a>],
        psize: usize,
        ssize: usize,
    ) -> Result<Placements, Error> {
        /// One buffer of one tensor: bytes `start..end` of memory object `root`; `who` is
        /// the tensor's index in `items` times 5 plus the buffer's position. Small, so that
        /// sorting tens of thousands of them stays cheap.
        #[derive(Clone, Copy)]
        struct Use {
            root: usize,
            start: usize,
            end: usize,
            who: usize,
            written: bool,
        }
        const NAMES: [&str; 5] = ["param", "grad", "m", "v", "ibar"];
        let sizes = sizes(psize, ssize);
        let ctx = self.shared.context.as_ptr() as usize;
        // The common layout is checked in one pass with no allocation: each buffer position
        // (param, grad, m, v, ibar) cut from one memory object of its own, tensor after
        // tensor at increasing offsets (slabs). `lane[slot]`: that object and the end of the
        // previous tensor's buffer in it. Anything else (own allocations, buffers out of
        // order, one gradient for two tensors) goes through the general check below.
        let mut lane: [Option<(usize, usize)>; 5] = [None; 5];
        let mut ordered = true;
        let mut placed = Placements {
            keys: Vec::with_capacity(items.len()),
            offsets: Vec::with_capacity(items.len()),
        };
        for it in items {
            let (mut key, mut offsets, mut whole) = ([0; 5], [0; 5], true);
            for (slot, (buf, size)) in it.bufs().into_iter().zip(sizes).enumerate() {
                let Some(buf) = buf else { continue };
                if buf.place.context != ctx {
                    return Err(Error::ForeignBuffer {
                        tensor: it.tensor,
                        name: it.name.map(str::to_string),
                        buffer: NAMES[slot],
                    });
                }
                let root = buf.place.root.as_ptr() as usize;
                key[slot] = root;
                match buf.place.elements(size) {
                    Some(o) => offsets[slot] = o,
                    None => whole = false,
                }
                if ordered {
                    let start = buf.place.offset;
                    ordered = lane[slot].is_none_or(|(r, end)| r == root && start >= end);
                    lane[slot] = Some((root, start.saturating_add(it.len.saturating_mul(size))));
                }
            }
            placed.keys.push(whole.then_some(key));
            placed.offsets.push(offsets);
        }
        // One object per position, and no object in two positions.
        let roots = lane.map(|l| l.map(|(r, _)| r));
        let distinct = (0..5).all(|a| (0..a).all(|b| roots[a].is_none() || roots[a] != roots[b]));
        if ordered && distinct {
            return Ok(placed);
        }
        let mut by_slot: [Vec<Use>; 5] = Default::default();
        for (index, it) in items.iter().enumerate() {
            for (slot, (buf, size)) in it.bufs().into_iter().zip(sizes).enumerate() {
                let Some(buf) = buf else { continue };
                let offset = buf.place.offset;
                by_slot[slot].push(Use {
                    root: buf.place.root.as_ptr() as usize,
                    start: offset,
                    end: offset.saturating_add(it.len.saturating_mul(size)),
                    who: index * 5 + slot,
                    // Every buffer but the gradient is written.
                    written: slot != 1,
                });
            }
        }
        // Grouped by memory object and sorted by start within each: every overlapping pair
        // meets when its later member is reached, against the furthest-reaching earlier use
        // (any, or written). Sorting tens of thousands of uses costs milliseconds; slabs are
        // already in that order, which a scan confirms.
        let mut uses = by_slot.concat();
        // Each memory object in one run of non-decreasing starts (few runs: slab-like).
        let grouped_by_root = |uses: &[Use]| {
            let mut roots: Vec<usize> = uses.first().map(|u| u.root).into_iter().collect();
            for w in uses.windows(2) {
                if w[0].root != w[1].root {
                    roots.push(w[1].root);
                    if roots.len() > 64 {
                        return false;
                    }
                } else if w[1].start < w[0].start {
                    return false;
                }
            }
            let n = roots.len();
            roots.sort_unstable();
            roots.dedup();
            roots.len() == n
        };
        if !grouped_by_root(&uses) {
            uses.sort_unstable_by_key(|u| (u.root, u.start, u.who));
        }
        let (mut any, mut written): (Option<usize>, Option<usize>) = (None, None);
        for i in 0..uses.len() {
            let u = uses[i];
            if i > 0 && uses[i - 1].root != u.root {
                (any, written) = (None, None);
            }
            let reaches = |j: Option<usize>| j.filter(|&j| uses[j].end > u.start);
            let clash = if u.written {
                reaches(any)
            } else {
                reaches(written)
            };
            if let Some(j) = clash {
                // Name the later buffer in step order, the other one beside it.
                let (a, b) = (u.who.max(uses[j].who), u.who.min(uses[j].who));
                let (ta, tb) = (&items[a / 5], &items[b / 5]);
                return Err(Error::Aliased {
                    tensor: ta.tensor,
                    name: ta.name.map(str::to_string),
                    buffer: NAMES[a % 5],
                    other_tensor: tb.tensor,
                    other_buffer: NAMES[b % 5],
                });
            }
            if any.is_none_or(|j| uses[j].end < u.end) {
                any = Some(i);
            }
            if u.written && written.is_none_or(|j| uses[j].end < u.end) {
                written = Some(i);
            }
        }
        Ok(placed)
    }

    /// The bandwidth floor of [`Backend::step_tensors`] over the same tensors: one pass that
    /// reads and writes every buffer a step touches, in place, with the same launches, and
    /// adds 0 to each value. For benchmarks: a step cannot move less memory than this.
    pub fn floor_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Error> {
        // Default coefficients: `reserved2` is the 0 the floor adds.
        let zero = Coeffs::default();
        if let Some(done) = self.step_kept(tensors, "sage_cl_floor", false, |_| &zero) {
            return done.map(|_| ());
        }
        let items = items(tensors, |_| &zero)?;
        self.step_items::<P, S>(&items, tensors.len(), "sage_cl_floor", false)
            .map(|_| ())
    }

    /// Whether gradient-norm partials accumulate in `double` here ([`Builder::f64_norms`]).
    pub fn f64_norms(&self) -> bool {
        self.shared.norm_fp64
    }

    /// `Σ x²` of each buffer: every chunk partial of every buffer ([`sage_core::norm`]) with
    /// one launch per [`tensors_per_launch`](Self::tensors_per_launch) buffers and one read for
    /// all, then each buffer's partials folded on the host in chunk order
    /// ([`norm::fold`]): exactly what [`Backend::sq_norm_chunks`] and the fold give.
    pub fn sq_norms<E: Element>(&mut self, bufs: &[&ClBuffer<E>]) -> Result<Vec<f64>, Error> {
        let items: Vec<NormItem<'_>> = bufs.iter().map(|b| NormItem::whole(b)).collect();
        let mut partials = vec![0f64; items.iter().map(|i| i.chunks).sum()];
        self.norm_partials::<E>(&items, &mut partials)?;
        let mut at = 0;
        Ok(items
            .iter()
            .map(|i| {
                let s = norm::fold(partials[at..at + i.chunks].iter().copied());
                at += i.chunks;
                s
            })
            .collect())
    }

    /// The chunk partials of `items`, back to back, into `out` (exactly their number): one
    /// work-group (CPU devices: one work-item) per chunk, one launch per `slots` buffers, one
    /// blocking read.
    fn norm_partials<E: Element>(
        &mut self,
        items: &[NormItem<'_>],
        out: &mut [f64],
    ) -> Result<(), Error> {
        let total: usize = items.iter().map(|i| i.chunks).sum();
        check_len("norm partials", total, out.len())?;
        let Some(partials) = self.chunk_launches::<E>(items, "sage_cl_norm_partials")? else {
            return Ok(());
        };
        if self.shared.norm_fp64 {
            self.read_raw(&partials, out, "reading norm partials")?;
        } else {
            let mut host = vec![0f32; 2 * total];
            self.read_raw(&partials, &mut host, "reading norm partials")?;
            for (o, p) in out.iter_mut().zip(host.chunks_exact(2)) {
                *o = source::widen_partial(p[0], p[1]);
            }
        }
        Ok(())
    }

    /// The read floor of the norm pass over `bufs` (benchmarks): the same launches reading
    /// every element once, summed in `float` and stored nowhere; queued, not waited for.
    pub fn floor_read<E: Element>(&mut self, bufs: &[&ClBuffer<E>]) -> Result<(), Error> {
        let items: Vec<NormItem<'_>> = bufs.iter().map(|b| NormItem::whole(b)).collect();
        self.chunk_launches::<E>(&items, "sage_cl_read_floor")
            .map(|_| ())
    }

    /// Enqueues kernel `name` of the norm program over the chunks of `items` (one launch per
    /// `slots` buffers); returns the partials buffer it writes, or `None` when there is no
    /// chunk.
    fn chunk_launches<E: Element>(
        &mut self,
        items: &[NormItem<'_>],
        name: &'static str,
    ) -> Result<Option<Mem>, Error> {
        let total: usize = items.iter().map(|i| i.chunks).sum();
        let live: Vec<&NormItem<'_>> = items.iter().filter(|i| i.chunks > 0).collect();
        if live.is_empty() {
            return Ok(None);
        }
        let key = ProgramKey::Norm(E::DTYPE);
        let (k, wg) = self.kernel(key, name)?;
        let per = self.shared.slots;
        let fp64 = self.shared.norm_fp64;
        let roots: Vec<Option<usize>> = live.iter().map(|it| it.root()).collect();
        let mut launches = plan_launches(&roots, per);
        // tab[4s] = buffer length, tab[4s+1] = first chunk, tab[4s+2] = chunks of the launch
        // so far, tab[4s+3] = offset in its root (packed). `groups` counts chunks here.
        let mut tab = Vec::with_capacity(4 * live.len());
        for l in &mut launches {
            let mut end = 0usize;
            for it in &live[l.first..l.first + l.count] {
                end += it.chunks;
                let off = it.place.and_then(|(_, o)| o).unwrap_or(0);
                tab.extend([it.len as u64, it.first as u64, end as u64, off]);
            }
            l.groups = end;
        }
        if total > u32::MAX as usize {
            return Err(Error::TooLarge(format!("{total} norm chunks in one call")));
        }
        let table = self.table(u64_bytes(&tab))?;
        let packed_kernel = if launches.iter().any(|l| l.packed) {
            let packed_name = match name {
                "sage_cl_norm_partials" => "sage_cl_norm_partials_packed",
                _ => "sage_cl_read_floor_packed",
            };
            Some(self.kernel(key, packed_name)?)
        } else {
            None
        };
        // A partial is one double, or a (sum, exponent) pair of floats.
        let bytes = total * 8;
        let partials = match &self.partials {
            Some((m, n)) if *n >= bytes => m.clone(),
            _ => {
                self.partials = None;
                let n = bytes.next_power_of_two().max(1024);
                let m = self
                    .mem(n, 1, None)?
                    .ok_or_else(|| Error::TooLarge("internal: norm scratch".into()))?;
                self.partials = Some((m.clone(), n));
                m
            }
        };
        let mut pbase = 0usize;
        for l in &launches {
            let chunk = &live[l.first..l.first + l.count];
            let (kern, wg) = match (&packed_kernel, l.packed) {
                (Some((pk, pwg)), true) => (pk, *pwg),
                _ => (&k, wg),
            };
            let set = |i: u32, a: ArgVal| {
                core::set_kernel_arg(kern, i, a)
                    .map_err(|e| Error::cl("setting a kernel argument", e))
            };
            set(0, ArgVal::mem(&table))?;
            set(1, ArgVal::scalar(&(l.first as u32)))?;
            set(2, ArgVal::scalar(&(l.count as u32)))?;
            set(3, ArgVal::mem(&partials))?;
            set(4, ArgVal::scalar(&(pbase as u32)))?;
            set(
                5,
                if fp64 {
                    ArgVal::local::<f64>(&wg)
                } else {
                    ArgVal::local::<f32>(&wg)
                },
            )?;
            // Kept alive until the launch is enqueued (OpenCL retains it for the kernel).
            let chunk_slot;
            if l.packed {
                let mut slot_of = Vec::with_capacity(l.groups);
                for (s, it) in chunk.iter().enumerate() {
                    slot_of.extend(std::iter::repeat_n(s as u32, it.chunks));
                }
                chunk_slot = self.table(u32_bytes(&slot_of))?;
                set(6, ArgVal::mem(&chunk_slot))?;
                let root = chunk[0].place.map(|(p, _)| &p.root);
                set(7, opt_mem(root))?;
            } else {
                for s in 0..per {
                    let a = match chunk.get(s) {
                        Some(it) => opt_mem(it.mem),
                        None => ArgVal::mem_null(),
                    };
                    set(6 + s as u32, a)?;
                }
            }
            // One work-group per chunk, or one work-item per chunk on CPU devices.
            let groups = if self.shared.per_item > 1 {
                l.groups.div_ceil(wg)
            } else {
                l.groups
            };
            self.count_launch(true, l.packed);
            self.enqueue(kern, groups, wg)?;
            pbase += l.groups;
        }
        Ok(Some(partials))
    }

    fn read_raw<T: core::OclPrm>(
        &self,
        mem: &Mem,
        out: &mut [T],
        op: &'static str,
    ) -> Result<(), Error> {
        // SAFETY: blocking read into `out`, which outlives it.
        unsafe {
            core::enqueue_read_buffer(
                &self.shared.queue,
                mem,
                true,
                0,
                out,
                None::<()>,
                None::<()>,
            )
        }
        .map_err(|e| Error::cl(op, e))
    }

    /// Uploads a step's launch table.
    fn upload_table(&self, t: &Table) -> Result<DeviceTable, Error> {
        Ok(DeviceTable {
            slots: self.table(t.slot_bytes())?,
            coeffs: self.table(t.coeff_bytes())?,
        })
    }
}

impl Backend for OpenCl {
    type Error = Error;
    type Buf<E: Element> = ClBuffer<E>;

    fn len<E: Element>(&self, buf: &ClBuffer<E>) -> usize {
        buf.len
    }

    fn sq_norm_chunks<E: Element>(
        &mut self,
        buf: &ClBuffer<E>,
        first: usize,
        out: &mut [f64],
    ) -> Result<(), Error> {
        let chunks = norm::chunk_count(buf.len);
        let end = first.saturating_add(out.len());
        if end > chunks {
            return Err(Error::LengthMismatch {
                buffer: "norm chunks (first + count)",
                expected: chunks,
                got: end,
            });
        }
        let item = NormItem::window(buf, first, out.len());
        self.norm_partials::<E>(&[item], out)
    }

    /// All partials in one launch and one read (the provided method reads them 32 at a time),
    /// folded on the host: the same bits.
    fn sq_norm<E: Element>(&mut self, buf: &ClBuffer<E>) -> Result<f64, Error> {
        Ok(self.sq_norms(&[buf])?[0])
    }

    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut ClBuffer<S>,
        param: &ClBuffer<P>,
        grad: &ClBuffer<P>,
        k: &Coeffs,
    ) -> Result<(), Error> {
        let n = param.len;
        check_len("grad", n, grad.len)?;
        check_len("state", n, acc.len)?;
        if n == 0 {
            return Ok(());
        }
        // sage_core::Accumulate in the shared body's SAGE_ACC_* numbering.
        let which: i32 = match which {
            Accumulate::Moment => 0,
            Accumulate::SecondMoment => 1,
            Accumulate::InfNorm => 2,
            Accumulate::Sensitivity => 3,
        };
        // The state buffer as the item's `m`: checked against θ and the gradient like a step's.
        let it = Item {
            tensor: 0,
            name: None,
            k,
            len: n,
            p: Buf::of(param),
            g: Buf::of(grad),
            m: Some(Buf::of(acc)),
            v: None,
            b: None,
        };
        self.check_items(std::slice::from_ref(&it), P::DTYPE.size(), S::DTYPE.size())?;
        let (kern, wg) = self.kernel(ProgramKey::Step(P::DTYPE, S::DTYPE), "sage_cl_accumulate")?;
        let table = self.upload_table(&Table::single(k, n, 0))?;
        let first = set_table(&kern, &table.slots, &table.coeffs, 0)?;
        let args = [
            ArgVal::scalar(&which),
            ArgVal::mem(mem_of(acc)),
            ArgVal::mem(mem_of(param)),
            ArgVal::mem(mem_of(grad)),
        ];
        for (i, a) in args.into_iter().enumerate() {
            core::set_kernel_arg(&kern, first + i as u32, a)
                .map_err(|e| Error::cl("setting a kernel argument", e))?;
        }
        self.enqueue(&kern, n.div_ceil(wg), wg)
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Error> {
        let Some(it) = item((0, None), k, t.param, t.grad, t.m, t.v, t.ibar)? else {
            return Ok(());
        };
        self.check_items(std::slice::from_ref(&it), P::DTYPE.size(), S::DTYPE.size())?;
        let n = it.len;
        let (kern, wg) = self.kernel(ProgramKey::Step(P::DTYPE, S::DTYPE), "sage_cl_apply")?;
        let present = present(t.m.is_some(), t.v.is_some(), t.ibar.is_some());
        let table = self.upload_table(&Table::single(k, n, present))?;
        let first = set_table(&kern, &table.slots, &table.coeffs, 0)?;
        let args = [
            ArgVal::mem(it.p.mem),
            ArgVal::mem(it.g.mem),
            opt_mem(it.m.map(|b| b.mem)),
            opt_mem(it.v.map(|b| b.mem)),
            opt_mem(it.b.map(|b| b.mem)),
        ];
        for (i, a) in args.into_iter().enumerate() {
            core::set_kernel_arg(&kern, first + i as u32, a)
                .map_err(|e| Error::cl("setting a kernel argument", e))?;
        }
        self.enqueue(&kern, n.div_ceil(wg), wg)
    }

    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Error> {
        let it = item(
            (0, None),
            k,
            t.param,
            t.grad,
            t.m.as_deref(),
            t.v.as_deref(),
            t.ibar.as_deref(),
        )?;
        let items: Vec<Item<'_>> = it.into_iter().collect();
        // No count wanted here: the launch stays asynchronous.
        self.step_items::<P, S>(&items, 1, "sage_cl_step", false)
            .map(|_| ())
    }

    /// Every gradient's chunk partials (one launch per
    /// [`tensors_per_launch`](OpenCl::tensors_per_launch) tensors, one read for all), each
    /// tensor's folded on the host in chunk order.
    fn grad_sq_norms<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Error> {
        let grads: Vec<&ClBuffer<P>> = tensors.iter().map(|t| t.grad()).collect();
        let norms = self.sq_norms(&grads)?;
        for (t, n) in tensors.iter_mut().zip(norms) {
            t.set_grad_sq_norm(n);
        }
        Ok(())
    }

    /// Every gradient's chunk partials with the launches of
    /// [`grad_sq_norms`](Self::grad_sq_norms) and one read.
    fn grad_norm_partials<P: Element, S: Element>(
        &mut self,
        tensors: &[ParamTensor<'_, Self, P, S>],
        out: &mut [f64],
    ) -> Result<(), Error> {
        let items: Vec<NormItem<'_>> = tensors.iter().map(|t| NormItem::whole(t.grad())).collect();
        self.norm_partials::<P>(&items, out)
    }

    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Error> {
        // A step over the layout of the last one reuses its launch tables.
        if let Some(counts) = self.step_kept(tensors, "sage_cl_step", true, |t| t.coeffs()) {
            for (t, n) in tensors.iter_mut().zip(counts?) {
                t.set_non_finite(n);
            }
            return Ok(());
        }
        // Every tensor is checked before any is launched: a bad one changes nothing.
        let items = items(tensors, |t| t.coeffs())?;
        // Every tensor's non-finite stored parameters, counted by the step kernel (an empty
        // tensor, which is no item, has none).
        let counts = self.step_items::<P, S>(&items, tensors.len(), "sage_cl_step", true)?;
        let at: Vec<usize> = items.iter().map(|it| it.tensor).collect();
        drop(items);
        for t in tensors.iter_mut() {
            t.set_non_finite(0);
        }
        for (i, n) in at.into_iter().zip(counts) {
            tensors[i].set_non_finite(n);
        }
        Ok(())
    }
}

/// Host copies for checkpoints, the conformance suite and anything else generic over
/// [`HostBuffers`]: owned buffers are [`ClBuffer`]s, every copy is a blocking transfer on the
/// backend's in-order queue.
impl HostBuffers for OpenCl {
    type Owned<E: Element> = ClBuffer<E>;

    /// `opencl:P:D (device name)`.
    fn describe(&self, out: &mut dyn std::fmt::Write) -> std::fmt::Result {
        let d = &self.shared.desc;
        write!(out, "opencl:{}:{} ({})", d.platform, d.device, d.name)
    }

    /// Every storage type on every device: f16 is stored through `vload_half` /
    /// `vstore_half_rte`, core OpenCL, so it needs no `cl_khr_fp16`.
    fn supports(&self, d: DType) -> bool {
        let _ = d;
        true
    }

    fn upload<E: Element>(&mut self, data: &[E]) -> Result<ClBuffer<E>, Error> {
        OpenCl::upload(self, data)
    }

    fn copy_to_host<E: Element>(&mut self, buf: &ClBuffer<E>, out: &mut [E]) -> Result<(), Error> {
        self.read(buf, out)
    }

    fn copy_from_host<E: Element>(
        &mut self,
        buf: &mut ClBuffer<E>,
        data: &[E],
    ) -> Result<(), Error> {
        self.write(buf, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sage_core::{Algorithm, BackendError, Config, Optimizer, ParamGroup, TensorState};

    /// Runs of two or more equal keys are packed, the rest go `per` at a time, all in order.
    #[test]
    fn launches_follow_the_items() {
        let plan = |keys: &[Option<u8>], per| {
            plan_launches(keys, per)
                .iter()
                .map(|l| (l.first, l.count, l.packed))
                .collect::<Vec<_>>()
        };
        let (a, b) = (Some(1u8), Some(2u8));
        assert_eq!(
            plan(&[None, None, None, a, a, a, b, None, b, b], 2),
            [
                (0, 2, false),
                (2, 1, false),
                (3, 3, true),
                (6, 2, false),
                (8, 2, true)
            ]
        );
        assert_eq!(plan(&[a, b, a, b], 16), [(0, 4, false)]);
        assert!(plan(&[], 4).is_empty());
    }

    /// A backend with 2 tensors per launch, or `None` where the machine has no OpenCL (a
    /// failure with `SAGE_REQUIRE_OPENCL` set).
    fn two_per_launch() -> Option<OpenCl> {
        match OpenCl::builder().max_tensors_per_launch(2).build() {
            Ok(cl) => Some(cl),
            Err(e) if std::env::var_os("SAGE_REQUIRE_OPENCL").is_none() => {
                eprintln!("skipped: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// A driver failure at a later launch of a multi-tensor step is a partial step that says
    /// how many tensors were stepped (those of the launches already enqueued; an empty tensor
    /// among them counts, it has nothing to do), never a plain error that invites a retry;
    /// at the first launch it is a plain error and nothing changed. A failed read-back of the
    /// non-finite counts (after every launch) is a partial step of all the tensors.
    #[test]
    fn a_failure_after_the_first_launch_is_a_partial_step() {
        let Some(cl) = two_per_launch() else { return };
        // Items (non-empty tensors): 0, 2 | 3, 4 | 5.
        // (failing launch, failing read-back of the counts, tensors applied)
        let cases = [
            (None, false, 6),
            (Some(0), false, 0),
            (Some(1), false, 3),
            (Some(2), false, 5),
            (None, true, 6),
        ];
        partial_steps(&cl, &[3, 0, 5, 7, 2, 4], |_| false, &cases);
    }

    /// The same across packed launches: tensors 1 to 3 are cut from slabs (one packed
    /// launch), 0 and 4 have buffers of their own (a launch each), in step order.
    #[test]
    fn a_failed_packed_launch_is_a_partial_step() {
        let Some(cl) = two_per_launch() else { return };
        let cases = [
            (None, false, 5),
            (Some(0), false, 0),
            (Some(1), false, 1),
            (Some(2), false, 4),
            (None, true, 5),
        ];
        partial_steps(&cl, &[3, 5, 7, 2, 4], |i| (1..4).contains(&i), &cases);
    }

    /// Steps tensors of `lens` (those with `from_slab(i)` cut from slabs) with each case's
    /// injected failure and checks the error and which tensors moved.
    fn partial_steps(
        cl: &OpenCl,
        lens: &[usize],
        from_slab: impl Fn(usize) -> bool,
        cases: &[(Option<usize>, bool, usize)],
    ) {
        let cfg = Config::reference(Algorithm::adamw(), 1e-2);
        for &(fail, read_back, applied) in cases {
            let mut cl = cl.clone();
            cl.fail_launch = fail;
            cl.fail_read_back = read_back;
            let slabs: Vec<Vec<ClBuffer<f32>>> =
                (0..5).map(|_| cl.slab::<f32>(lens).unwrap().1).collect();
            let make = |stream: usize, i: usize, x: f32| {
                let mut b = if from_slab(i) {
                    slabs[stream][i].clone()
                } else {
                    cl.zeros(lens[i]).unwrap()
                };
                cl.write(&mut b, &vec![x; lens[i]]).unwrap();
                b
            };
            let mut ps: Vec<ClBuffer<f32>> = (0..lens.len()).map(|i| make(0, i, 1.0)).collect();
            let gs: Vec<ClBuffer<f32>> = (0..lens.len()).map(|i| make(1, i, 0.5)).collect();
            let mut st: Vec<TensorState<ClBuffer<f32>>> = (0..lens.len())
                .map(|i| {
                    let mut stream = 2;
                    TensorState::try_new(cfg.state_layout(true), |_| {
                        stream += 1;
                        Ok::<_, ()>(make(stream - 1, i, 0.0))
                    })
                    .unwrap()
                })
                .collect();
            let k = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()])
                .unwrap()
                .coeffs(1, 0, 1.0)
                .unwrap();
            let mut ts: Vec<ParamTensor<'_, OpenCl, f32, f32>> = ps
                .iter_mut()
                .zip(&gs)
                .zip(&mut st)
                .map(|((p, g), s)| {
                    let mut t = ParamTensor::new(p, g, s.view());
                    t.set_coeffs(k);
                    t
                })
                .collect();
            let r = cl.step_tensors(&mut ts);
            drop(ts);
            match (fail, r) {
                (None, Ok(())) if !read_back => {}
                (Some(0), Err(e)) => {
                    assert!(matches!(e, Error::Cl { .. }), "{e}");
                }
                (_, Err(e)) => {
                    let Error::Partial {
                        applied: a,
                        tensors,
                        ref cause,
                    } = e
                    else {
                        panic!("expected a partial step, got {e}")
                    };
                    assert_eq!((a, tensors), (applied, lens.len()), "{e}");
                    assert_eq!(cause.kind(), sage_core::ErrorKind::OutOfMemory);
                    assert_eq!(e.kind(), sage_core::ErrorKind::OutOfMemory);
                    assert!(e.to_string().contains("partial step"), "{e}");
                }
                (f, r) => panic!("launch {f:?} failing gave {r:?}"),
            }
            // `m` moves from 0 at any step with a non-zero gradient.
            for (i, s) in st.iter().enumerate() {
                let m = s.m.as_ref().unwrap();
                let moved = cl.download(m).unwrap().iter().any(|&x| x != 0.0);
                assert_eq!(
                    moved,
                    i < applied && lens[i] > 0,
                    "fail at {fail:?}: tensor {i}"
                );
            }
        }
    }
}
