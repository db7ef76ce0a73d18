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

mod builder;
mod items;
mod launch;
mod memory;
mod norm_pass;
mod programs;
mod step;

pub use builder::Builder;
use items::*;
pub use launch::LaunchCounts;
use launch::*;

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
