//! The few kernel calls aya does not wrap: bpffs detection, interface
//! facts, a pinned link's interface, memory maps of array maps and batched
//! reads of per-CPU arrays.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
    ptr::NonNull,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Whether `path` lives on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = cpath(path)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a properly sized out-buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(io::Error::last_os_error()) } else { Ok(idx) }
}

/// A socket for interface ioctls (`SIOCGIFHWADDR`, `SIOCETHTOOL`) on
/// `name`, once the name is known to fit `ifr_name`.
pub fn ioctl_socket(name: &str) -> io::Result<OwnedFd> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(sock)
}

/// MAC address of interface `name` in the calling thread's namespace.
pub fn mac(name: &str) -> io::Result<[u8; 6]> {
    let sock = ioctl_socket(name)?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills `req.ifr_ifru.ifru_hwaddr`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote the hardware address variant.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The `BPF_OBJ_GET` part of `union bpf_attr`. The padding is explicit:
/// the kernel refuses attributes with non-zero bytes it does not know.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Name of interface `index` in the calling thread's network namespace.
pub fn ifname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The interface a pinned XDP link is attached to; 0 once its interface is
/// gone (the link then survives, detached, until unpinned).
pub fn pinned_xdp_link_ifindex(path: &Path) -> io::Result<u32> {
    pinned_link_ifindex(path, BPF_LINK_TYPE_XDP)
}

/// The same for a pinned tcx link (the reply program's).
pub fn pinned_tcx_link_ifindex(path: &Path) -> io::Result<u32> {
    pinned_link_ifindex(path, BPF_LINK_TYPE_TCX)
}

/// Detaches the pinned link at `path` now. Removing a pin alone releases
/// the link only once bpffs frees the inode, after an RCU grace period;
/// meanwhile the program keeps running (and the interface stays busy).
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let fd = obj_get(path)?;
    let link_fd: [u32; 2] = [fd.as_raw_fd() as u32, 0];
    // SAFETY: BPF_LINK_DETACH reads the link fd from `link_fd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            link_fd.as_ptr(),
            std::mem::size_of_val(&link_fd),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let attr =
        ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: BPF_OBJ_GET reads `attr` (a valid path pointer) and returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pinned_link_ifindex(path: &Path, want_type: u32) -> io::Result<u32> {
    let fd = obj_get(path)?;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the union
    // whose xdp and tcx members start with the ifindex.
    let mut info = [0u64; 32];
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let link_type = info[0] as u32;
    if link_type != want_type {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("pinned link is of type {link_type}, not {want_type}"),
        ));
    }
    Ok(info[2] as u32)
}

/// The `BPF_MAP_*_BATCH` part of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads `count` elements of the array `fd` from index `start` with one
/// `BPF_MAP_LOOKUP_BATCH` call (instead of one call per element): element
/// `i`'s values land in `out[i * cpus .. (i + 1) * cpus]`. `T` must be the
/// map's value type; `cpus` is 1 for a plain array, else the possible CPUs
/// of a per-CPU array, whose values the kernel lays out in 8-byte strides
/// (so `T` must be a multiple of 8 bytes long there). Returns how many
/// elements were read (fewer at the end of the array).
pub fn lookup_batch<T: aya::Pod>(
    fd: BorrowedFd<'_>,
    start: u32,
    count: u32,
    cpus: usize,
    out: &mut Vec<T>,
) -> io::Result<u32> {
    if cpus == 0 || (cpus > 1 && !std::mem::size_of::<T>().is_multiple_of(8)) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    out.clear();
    // SAFETY: `T: Pod` is plain data, for which all-zero bytes are a value.
    out.resize(count as usize * cpus, unsafe { std::mem::zeroed() });
    let mut keys = vec![0u32; count as usize];
    // The kernel starts after the key `in_batch` names (none: at 0) and
    // writes the last key it read to `out_batch`.
    let after = start.wrapping_sub(1);
    let mut last = 0u32;
    let mut attr = BatchAttr {
        in_batch: if start == 0 { 0 } else { &after as *const u32 as u64 },
        out_batch: &mut last as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: out.as_mut_ptr() as u64,
        count,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the kernel writes at most `count` keys into `keys` and
    // `count * cpus` values of the map's value size (that of `T`, rounded
    // to 8 bytes: `T` is) into `out`, both sized for that above; `after`
    // and `last` live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    // ENOENT: the end of the array was reached; `count` says how far.
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    out.truncate(attr.count as usize * cpus);
    Ok(attr.count)
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array. The kernel lays
/// elements out in 8-byte strides, so `T` must be a multiple of 8 bytes
/// long, or a `u32` when the map's value is a pair of them (the ring map).
pub struct Mapped<T> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; mutation goes through &mut self.
unsafe impl<T: Send> Send for Mapped<T> {}

impl<T: Copy> Mapped<T> {
    /// Maps `len` elements of `T` from a map's fd.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    }

    /// Maps `len` elements of `T` starting `offset` bytes into a map's
    /// values (a multiple of the page size).
    pub fn new_at(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd(), offset)
    }

    /// Anonymous zeroed memory shaped like a map (for tests).
    #[cfg(test)]
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    }

    fn map(
        len: usize,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: libc::off_t,
    ) -> io::Result<Self> {
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: a fresh mapping of `bytes`; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<T>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the mapping is `len` elements long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above; &mut self makes this the only user-space writer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// A pointer to element `i` for volatile stores that the kernel side
    /// must see in program order.
    pub fn element(&mut self, i: usize) -> *mut T {
        assert!(i < self.len);
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.as_ptr().add(i) }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * std::mem::size_of::<T>()) };
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}
