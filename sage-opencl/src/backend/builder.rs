//! [`Builder`]: how an [`OpenCl`] backend is opened (device, compiler options, work per item).

use super::*;

/// How to open an [`OpenCl`] backend: which device, extra compiler options.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    pub(super) select: Select,
    pub(super) queue: Option<ocl::Queue>,
    pub(super) extra_options: String,
    pub(super) max_slots: Option<usize>,
    pub(super) per_item: Option<usize>,
    pub(super) no_fp64_norms: bool,
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
