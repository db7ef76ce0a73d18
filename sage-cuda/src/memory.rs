//! Device memory: uploads, downloads and typed copies, and the checks every buffer argument
//! passes (lengths, aliasing, the storage type behind a `CudaSlice`).

use crate::*;

pub(crate) fn type_confusion() -> CudaError {
    CudaError::TooLarge("internal: storage type does not match its DType".into())
}

/// `x` as a slice of `B`, when `A` is `B`.
pub(crate) fn same_slice<A: 'static, B: 'static>(x: &[A]) -> Option<&[B]> {
    if TypeId::of::<A>() == TypeId::of::<B>() {
        // SAFETY: A and B are the same type.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<B>(), x.len()) })
    } else {
        None
    }
}

/// `x` as a mutable slice of `B`, when `A` is `B`.
pub(crate) fn same_slice_mut<A: 'static, B: 'static>(x: &mut [A]) -> Option<&mut [B]> {
    if TypeId::of::<A>() == TypeId::of::<B>() {
        // SAFETY: A and B are the same type.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<B>(), x.len()) })
    } else {
        None
    }
}

/// `x` as a `B`, when `A` is `B`.
pub(crate) fn same_owned<A: 'static, B: 'static>(x: A) -> Option<B> {
    let b: Box<dyn Any> = Box::new(x);
    b.downcast::<B>().ok().map(|b| *b)
}

/// The scratch buffer in `slot`, reallocated (zeroed) when shorter than `n`.
pub(crate) fn grow<'s, T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'s mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'s mut CudaSlice<T>, CudaError> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None;
        let len = n.max(64).next_power_of_two();
        *slot = Some(
            stream
                .alloc_zeros::<T>(len)
                .map_err(|e| CudaError::driver("alloc scratch", e))?,
        );
    }
    slot.as_mut()
        .ok_or_else(|| CudaError::TooLarge("internal: scratch".into()))
}

/// The address of an optional buffer read on `stream` (0 when absent), with the guard that
/// orders other streams' later writes after this use.
pub(crate) fn read_ptr<'a, T>(
    s: Option<&'a CudaSlice<T>>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// [`read_ptr`] for a buffer written on `stream`.
pub(crate) fn write_ptr<'a, T>(
    s: Option<&'a mut CudaSlice<T>>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// The device address of a scratch buffer used only on `stream`.
pub(crate) fn raw<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

pub(crate) fn same_len(what: &'static str, expected: usize, got: usize) -> Result<(), CudaError> {
    if expected == got {
        Ok(())
    } else {
        Err(CudaError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Checks that the gradient and every present state buffer have the parameter's `n` elements.
pub(crate) fn same_lens(n: usize, grad: usize, state: [Option<usize>; 3]) -> Result<(), CudaError> {
    same_len("grad", n, grad)?;
    for (what, len) in ["m", "v", "ibar"].into_iter().zip(state) {
        if let Some(len) = len {
            same_len(what, n, len)?;
        }
    }
    Ok(())
}

impl Cuda {
    /// A device buffer holding `data`.
    pub fn upload<E: Element>(&self, data: &[E]) -> Result<CudaSlice<E>, CudaError> {
        match E::DTYPE {
            DType::F32 => self.upload_as::<E, f32>(data),
            DType::F16 => self.upload_as::<E, half::f16>(data),
            DType::Bf16 => self.upload_as::<E, half::bf16>(data),
        }
    }

    /// A device buffer of `n` zeros.
    pub fn zeros<E: Element>(&self, n: usize) -> Result<CudaSlice<E>, CudaError> {
        match E::DTYPE {
            DType::F32 => self.zeros_as::<E, f32>(n),
            DType::F16 => self.zeros_as::<E, half::f16>(n),
            DType::Bf16 => self.zeros_as::<E, half::bf16>(n),
        }
    }

    /// The contents of `buf` (waits for the stream).
    pub fn download<E: Element>(&self, buf: &CudaSlice<E>) -> Result<Vec<E>, CudaError> {
        let mut out = vec![E::default(); buf.len()];
        self.read(buf, &mut out)?;
        Ok(out)
    }

    pub(crate) fn upload_as<E: Element, T: DeviceRepr + ValidAsZeroBits + 'static>(
        &self,
        data: &[E],
    ) -> Result<CudaSlice<E>, CudaError> {
        let host: &[T] = same_slice(data).ok_or_else(type_confusion)?;
        let dev = if host.is_empty() {
            self.empty::<T>()?
        } else {
            self.stream
                .clone_htod(host)
                .map_err(|e| CudaError::driver("upload", e))?
        };
        same_owned(dev).ok_or_else(type_confusion)
    }

    pub(crate) fn zeros_as<E: Element, T: DeviceRepr + ValidAsZeroBits + 'static>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<E>, CudaError> {
        let dev = if n == 0 {
            self.empty::<T>()?
        } else {
            self.stream
                .alloc_zeros::<T>(n)
                .map_err(|e| CudaError::driver("alloc", e))?
        };
        same_owned(dev).ok_or_else(type_confusion)
    }

    /// A buffer of no elements (tensors may be empty).
    pub(crate) fn empty<T: DeviceRepr + ValidAsZeroBits>(&self) -> Result<CudaSlice<T>, CudaError> {
        match self.stream.null::<T>() {
            Ok(s) => Ok(s),
            Err(_) => {
                // A driver that refuses zero-byte allocations: own one element, expose none.
                let one = self
                    .stream
                    .alloc_zeros::<T>(1)
                    .map_err(|e| CudaError::driver("alloc", e))?;
                let p = one.leak();
                // SAFETY: `p` is a live allocation of one T, now owned by the new slice
                // (which frees it on drop); it claims none of it.
                Ok(unsafe { self.stream.upgrade_device_ptr::<T>(p, 0) })
            }
        }
    }

    /// Copies `buf` into `out` (same length) and waits for the copy.
    pub(crate) fn read_as<E: Element, T: DeviceRepr + 'static>(
        &self,
        buf: &CudaSlice<E>,
        out: &mut [E],
    ) -> Result<(), CudaError> {
        let typed: &CudaSlice<T> = (buf as &dyn Any)
            .downcast_ref()
            .ok_or_else(type_confusion)?;
        let host: &mut [T] = same_slice_mut(out).ok_or_else(type_confusion)?;
        self.stream
            .memcpy_dtoh(typed, host)
            .map_err(|e| CudaError::driver("download", e))?;
        self.synchronize()
    }

    /// Copies `data` into `buf` (same length), in place (a framework may hold the buffer's
    /// address), and waits for the copy.
    pub(crate) fn write_as<E: Element, T: DeviceRepr + 'static>(
        &self,
        buf: &mut CudaSlice<E>,
        data: &[E],
    ) -> Result<(), CudaError> {
        let typed: &mut CudaSlice<T> = (buf as &mut dyn Any)
            .downcast_mut()
            .ok_or_else(type_confusion)?;
        let host: &[T] = same_slice(data).ok_or_else(type_confusion)?;
        self.stream
            .memcpy_htod(host, typed)
            .map_err(|e| CudaError::driver("upload", e))?;
        self.synchronize()
    }

    /// Copies `buf` into `out`, which must have its length (waits for the stream).
    pub fn read<E: Element>(&self, buf: &CudaSlice<E>, out: &mut [E]) -> Result<(), CudaError> {
        same_len("host slice", buf.len(), out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        match E::DTYPE {
            DType::F32 => self.read_as::<E, f32>(buf, out),
            DType::F16 => self.read_as::<E, half::f16>(buf, out),
            DType::Bf16 => self.read_as::<E, half::bf16>(buf, out),
        }
    }

    /// Copies `data` into `buf`, which must have its length, in place: the allocation (and
    /// any framework's handle to it) stays. Ordered after everything queued before; returns
    /// once the copy is done.
    pub fn write<E: Element>(&self, buf: &mut CudaSlice<E>, data: &[E]) -> Result<(), CudaError> {
        same_len("host slice", buf.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        match E::DTYPE {
            DType::F32 => self.write_as::<E, f32>(buf, data),
            DType::F16 => self.write_as::<E, half::f16>(buf, data),
            DType::Bf16 => self.write_as::<E, half::bf16>(buf, data),
        }
    }
}
