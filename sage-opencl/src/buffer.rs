//! [`ClBuffer`]: an OpenCL buffer of `f32`, `f16` or `bf16` elements, the backend's `Buf<E>`.

use std::marker::PhantomData;

use ocl::core::{self, Mem, MemInfo, MemInfoResult, OclPrm};
use sage_core::Element;

use crate::Error;

/// A device buffer of `len` elements of `E`: a handle to an OpenCL memory object (cheap to
/// clone: OpenCL reference counting), which may be shared with a framework that owns it.
///
/// f16 and bf16 are 16-bit storage on the device; kernels compute in f32.
#[derive(Debug)]
pub struct ClBuffer<E: Element> {
    /// `None` for an empty buffer: OpenCL has no zero-sized memory objects.
    pub(crate) mem: Option<Mem>,
    /// Where `mem` lives (`None` when empty).
    pub(crate) place: Option<Place>,
    pub(crate) len: usize,
    _e: PhantomData<E>,
}

/// Where a buffer's memory lives, found once when the buffer is made: a step checks contexts
/// and overlaps, and packs tensors cut from the same buffers, without asking the driver.
#[derive(Clone, Debug)]
pub(crate) struct Place {
    /// The memory object at the root: a sub-buffer's parent, or the buffer itself.
    pub root: Mem,
    /// Bytes from the start of `root`.
    pub offset: usize,
    /// The OpenCL context it belongs to, as an address.
    pub context: usize,
}

impl Place {
    /// The offset in elements of `size` bytes, when it is a whole number of them (only then
    /// can a kernel address the buffer from its root).
    pub fn elements(&self, size: usize) -> Option<u64> {
        // Element sizes are powers of two: a mask and a shift, not a division per buffer.
        debug_assert!(size.is_power_of_two());
        (self.offset & (size - 1) == 0).then_some((self.offset >> size.trailing_zeros()) as u64)
    }
}

impl<E: Element> Clone for ClBuffer<E> {
    fn clone(&self) -> Self {
        ClBuffer {
            mem: self.mem.clone(),
            place: self.place.clone(),
            len: self.len,
            _e: PhantomData,
        }
    }
}

impl<E: Element> ClBuffer<E> {
    /// A buffer of its own (`mem` is its root) in `context`.
    pub(crate) fn own(mem: Option<Mem>, len: usize, context: usize) -> Self {
        let place = mem.as_ref().map(|m| Place {
            root: m.clone(),
            offset: 0,
            context,
        });
        ClBuffer {
            mem,
            place,
            len,
            _e: PhantomData,
        }
    }

    /// A sub-buffer `mem` of `len` elements at `place`.
    pub(crate) fn sub(mem: Mem, len: usize, place: Place) -> Self {
        ClBuffer {
            mem: Some(mem),
            place: Some(place),
            len,
            _e: PhantomData,
        }
    }

    /// Views an existing OpenCL memory object as elements of `E` (no copy: both handles
    /// refer to the same device memory). Its size must be a whole number of elements.
    pub fn from_mem(mem: &Mem) -> Result<Self, Error> {
        let bytes = match core::get_mem_object_info(mem, MemInfo::Size) {
            Ok(MemInfoResult::Size(n)) => n,
            Ok(_) => 0,
            Err(e) => return Err(Error::cl("querying a buffer's size", e)),
        };
        let size = E::DTYPE.size();
        if bytes % size != 0 {
            return Err(Error::TooLarge(format!(
                "a buffer of {bytes} bytes is not a whole number of {} elements",
                E::DTYPE
            )));
        }
        if bytes == 0 {
            return Ok(Self::own(None, 0, 0));
        }
        let query = |what| {
            core::get_mem_object_info(mem, what).map_err(|e| Error::cl("querying a buffer", e))
        };
        let context = match query(MemInfo::Context)? {
            MemInfoResult::Context(c) => c.as_ptr() as usize,
            _ => 0,
        };
        let place = match query(MemInfo::AssociatedMemobject)? {
            MemInfoResult::AssociatedMemobject(Some(parent)) => Place {
                root: parent,
                offset: match query(MemInfo::Offset)? {
                    MemInfoResult::Offset(o) => o,
                    _ => 0,
                },
                context,
            },
            _ => Place {
                root: mem.clone(),
                offset: 0,
                context,
            },
        };
        Ok(Self::sub(mem.clone(), bytes / size, place))
    }

    /// Views a framework's `ocl::Buffer<T>` as elements of `E`, without copying: e.g.
    /// `ClBuffer::<f32>::from_ocl(&buf_f32)` or `ClBuffer::<bf16>::from_ocl(&bits_u16)`.
    /// The element sizes must agree.
    pub fn from_ocl<T: OclPrm>(buf: &ocl::Buffer<T>) -> Result<Self, Error> {
        if std::mem::size_of::<T>() != E::DTYPE.size() {
            return Err(Error::TooLarge(format!(
                "an ocl::Buffer of {}-byte elements cannot hold {}",
                std::mem::size_of::<T>(),
                E::DTYPE
            )));
        }
        Self::from_mem(buf.as_core())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The OpenCL memory object (`None` when empty), to hand to other OpenCL code.
    pub fn as_mem(&self) -> Option<&Mem> {
        self.mem.as_ref()
    }
}

/// `x` as bytes. `E` is f32, f16 or bf16 (sealed): plain bits, no padding.
pub(crate) fn bytes<E: Element>(x: &[E]) -> &[u8] {
    debug_assert_eq!(std::mem::size_of::<E>(), E::DTYPE.size());
    // SAFETY: every Element is a plain-old-data float type of DTYPE.size() bytes.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// `x` as mutable bytes; every bit pattern is a valid `E`.
pub(crate) fn bytes_mut<E: Element>(x: &mut [E]) -> &mut [u8] {
    // SAFETY: as in `bytes`, and any bytes written form a valid f32/f16/bf16.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}
