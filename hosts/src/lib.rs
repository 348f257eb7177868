//! Certo's host side: what a hypervisor host does to run one certification VM.
//!
//! - [`hypervisor`]: the [`Hypervisor`](hypervisor::Hypervisor) seam and its libvirt
//!   implementation ([`LibvirtHypervisor`](hypervisor::LibvirtHypervisor)); domain XML rendered
//!   from templates per hypervisor type (`qemu`, `kvm`, `xen`, `test`).
//! - [`domain_name`]: `certo-r<RUN>-<TARGET>-a<ATTEMPT>` names, their parser, and [`reap`](domain_name::reap)
//!   for domains of runs that are no longer live.
//! - [`overlay`]: the VM's disk as a qcow2 overlay of the repository image (the base stays pristine).
//! - [`boot`]: the boot assets: the host's Debian kernel decompressed to `vmlinux` (PVH boot) and
//!   an initramfs with busybox, the virtio/ext4 modules, `/init` and the guest harness.
//! - [`guest`]: the kernel command line that tells the harness where the testbed is.
//!
//! Only the `hypervisor` module calls libvirt. See `hosts/README.md` for the guest protocol.

pub mod boot;
pub mod domain_name;
pub mod guest;
pub mod hypervisor;
pub mod overlay;
