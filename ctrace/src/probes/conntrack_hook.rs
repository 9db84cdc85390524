//! The conntrack hook (Linux 6.4+, BPF netfilter links): two tiny netfilter programs around conntrack's own
//! hook, armed only in a netns where a drop came out `uncertain` (a ct-less drop amid invalid packets). They
//! make `invalid` and raw-table drops exact:
//! - at priority -350 (after defragmentation, before the raw table) the packet's mark is deleted, so a mark
//!   is always from the packet's current pass;
//! - at priority -199 (right after conntrack, -200) a packet without an entry is marked: conntrack saw it and
//!   let it through unjudged-as-valid (`invalid`).
//!
//! A ct-less drop in a hooked netns is then `invalid` when marked and `netfilter_rule` when not (it never got
//! past conntrack; conntrack's own drops are told apart by the `drop` counter), provided conntrack runs for
//! the packet's family there (without conntrack every packet is ct-less): the kfree_skb program looks for
//! conntrack's own hook function among the netns's LOCAL_OUT hooks. Both programs run on every IPv4 and
//! IPv6 packet entering PRE_ROUTING and LOCAL_OUT of that netns, hence armed per netns and bounded.
//!
//! aya has no netfilter program type, so the programs are assembled here (8 and 12 instructions) and loaded
//! and linked with the bpf(2) syscall. The kernel's link holds a reference on the netns: links are dropped
//! when the netns is gone (see `baselines::Pruner`) or ctrace exits, and die with the process on SIGKILL.

use std::{
    collections::HashMap,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{Ebpf, maps::Map};

use crate::btf::Btf;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
/// After nf_defrag (-400), before the raw table (-300).
const CLEAR_PRIORITY: i32 = -350;
/// Right after conntrack (NF_IP_PRI_CONNTRACK, NF_IP6_PRI_CONNTRACK: -200).
const MARK_PRIORITY: i32 = -199;
/// Evidence from a netns counts from this long after its links exist (a packet already past the hooks when
/// they were attached has no mark).
const GRACE_NS: u64 = 1_000_000;

/// The loaded programs and the hooked netns.
pub struct ConntrackHook {
    clear: OwnedFd,
    mark: OwnedFd,
    attach_type: u32,
    /// The links of each hooked netns, by inode.
    armed: HashMap<u32, Vec<OwnedFd>>,
}

impl ConntrackHook {
    /// Assembles and loads both programs against the object's CT_PASSED map. An error says why the kernel
    /// cannot do this (too old, or built without CONFIG_NETFILTER_BPF_LINK).
    pub fn load(ebpf: &Ebpf, btf: &Btf, skb_nfct: u32) -> anyhow::Result<ConntrackHook> {
        let prog_type = btf
            .enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER")
            .map_err(|_| anyhow!("this kernel has no BPF netfilter programs (Linux 6.4+)"))?;
        let attach_type = btf
            .enum_value("bpf_attach_type", "BPF_NETFILTER")
            .map_err(|_| anyhow!("this kernel has no BPF netfilter links (Linux 6.4+)"))?;
        if btf.enum_value("bpf_link_type", "BPF_LINK_TYPE_NETFILTER").is_err() {
            bail!("this kernel has no BPF netfilter links (Linux 6.4+)");
        }
        let ct_passed = match ebpf.map("CT_PASSED") {
            Some(Map::LruHashMap(data)) => data.fd().as_fd().as_raw_fd(),
            _ => bail!("map CT_PASSED missing from the eBPF object"),
        };
        let skb_nfct = i16::try_from(skb_nfct).context("sk_buff._nfct is beyond a load offset")?;
        let (prog_type, attach_type) = (prog_type as u32, attach_type as u32);
        Ok(ConntrackHook {
            clear: load_program(prog_type, attach_type, &clear_program(ct_passed))
                .context("the kernel refused the conntrack hook's clearing program")?,
            mark: load_program(prog_type, attach_type, &mark_program(ct_passed, skb_nfct))
                .context("the kernel refused the conntrack hook's marking program")?,
            attach_type,
            armed: HashMap::new(),
        })
    }

    pub fn is_armed(&self, netns: u32) -> bool {
        self.armed.contains_key(&netns)
    }

    pub fn armed(&self) -> impl Iterator<Item = u32> + '_ {
        self.armed.keys().copied()
    }

    /// Links the programs into the netns at `path` (a /run/netns or /proc/.../ns/net file), IPv4 and IPv6,
    /// PRE_ROUTING and LOCAL_OUT. Links are created in the netns of the calling thread, hence a thread.
    /// Returns the monotonic time from which the evidence counts.
    pub fn arm(&mut self, netns: u32, path: &Path) -> anyhow::Result<u64> {
        let path: PathBuf = path.to_owned();
        let (clear, mark, attach_type) = (self.clear.as_raw_fd(), self.mark.as_raw_fd(), self.attach_type);
        let links = std::thread::spawn(move || -> anyhow::Result<Vec<OwnedFd>> {
            let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter the netns of {}", path.display()))?;
            let mut links = Vec::with_capacity(8);
            for pf in [NFPROTO_IPV4, NFPROTO_IPV6] {
                for hook in [NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT] {
                    links.push(link_create(clear, attach_type, pf, hook, CLEAR_PRIORITY)?);
                    links.push(link_create(mark, attach_type, pf, hook, MARK_PRIORITY)?);
                }
            }
            Ok(links)
        })
        .join()
        .map_err(|_| anyhow!("the thread arming the conntrack hook panicked"))??;
        self.armed.insert(netns, links);
        Ok(super::monotonic_ns() + GRACE_NS)
    }

    /// Unlinks the programs from `netns` (releasing the kernel's reference on it).
    pub fn disarm(&mut self, netns: u32) {
        self.armed.remove(&netns);
    }
}

/// One eBPF instruction (struct bpf_insn).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const LDX_DW: u8 = 0x79; // dst = *(u64 *)(src + off)
const STX_DW: u8 = 0x7b; // *(u64 *)(dst + off) = src
const MOV_K: u8 = 0xb7; // dst = imm
const MOV_X: u8 = 0xbf; // dst = src
const ADD_K: u8 = 0x07; // dst += imm
const JEQ_K: u8 = 0x15; // if dst == imm goto +off
const JNE_K: u8 = 0x55; // if dst != imm goto +off
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const MAP_DELETE_ELEM: i32 = 3;
const KTIME_GET_NS: i32 = 5;
const NF_ACCEPT: i32 = 1;
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R10: u8 = 10;

/// A little assembler: instructions plus forward jumps to named labels, resolved by `finish`.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn {
            code,
            regs: dst | src << 4,
            off,
            imm,
        });
        self
    }

    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.op(code, dst, 0, 0, imm)
    }

    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }

    /// r<dst> = the map with fd `map` (two instruction slots).
    fn ld_map(&mut self, dst: u8, map: RawFd) -> &mut Self {
        self.op(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map).op(0, 0, 0, 0, 0)
    }

    /// r<dst> = r10 + off: a pointer to a stack slot.
    fn stack_ptr(&mut self, dst: u8, off: i32) -> &mut Self {
        self.op(MOV_X, dst, R10, 0, 0).op(ADD_K, dst, 0, 0, off)
    }

    /// `r0 = NF_ACCEPT; exit` at label "accept".
    fn accept(&mut self) -> &mut Self {
        self.label("accept").op(MOV_K, R0, 0, 0, NF_ACCEPT).op(EXIT, 0, 0, 0, 0)
    }

    fn finish(&mut self) -> Vec<Insn> {
        for &(at, label) in &self.jumps {
            let target = self.labels[label];
            self.insns[at].off = (target - at - 1) as i16;
        }
        std::mem::take(&mut self.insns)
    }
}

/// `if CT_PASSED has ctx->skb { delete it }; return NF_ACCEPT`. The lookup first: a delete takes the bucket
/// lock even when the key is absent, and nearly every packet has no mark.
fn clear_program(ct_passed: RawFd) -> Vec<Insn> {
    let mut a = Asm::default();
    a.op(LDX_DW, R6, R1, 8, 0) // r6 = ctx->skb (struct bpf_nf_ctx { state; skb; })
        .op(STX_DW, R10, R6, -8, 0) // key = the skb's address
        .ld_map(R1, ct_passed)
        .stack_ptr(R2, -8)
        .op(CALL, 0, 0, 0, MAP_LOOKUP_ELEM)
        .jump(JEQ_K, R0, 0, "accept") // no mark: nothing to do
        .ld_map(R1, ct_passed)
        .stack_ptr(R2, -8)
        .op(CALL, 0, 0, 0, MAP_DELETE_ELEM)
        .accept();
    a.finish()
}

/// `if !skb->_nfct { CT_PASSED[skb] = now }; return NF_ACCEPT`.
fn mark_program(ct_passed: RawFd, skb_nfct: i16) -> Vec<Insn> {
    let mut a = Asm::default();
    a.op(LDX_DW, R6, R1, 8, 0) // r6 = ctx->skb
        .op(LDX_DW, R2, R6, skb_nfct, 0) // r2 = skb->_nfct
        .jump(JNE_K, R2, 0, "accept") // an entry, or NOTRACK: nothing to say
        .op(STX_DW, R10, R6, -8, 0) // key = the skb's address
        .op(CALL, 0, 0, 0, KTIME_GET_NS)
        .op(STX_DW, R10, R0, -16, 0) // value = now
        .ld_map(R1, ct_passed)
        .stack_ptr(R2, -8)
        .stack_ptr(R3, -16)
        .op(MOV_K, R4, 0, 0, 0) // BPF_ANY
        .op(CALL, 0, 0, 0, MAP_UPDATE_ELEM)
        .accept();
    a.finish()
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded union bpf_attr of the size given; the kernel reads (and for the log,
    // writes through pointers) only within the buffers it points to, which outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// BPF_PROG_LOAD; on failure the error carries the verifier's log.
fn load_program(prog_type: u32, attach_type: u32, insns: &[Insn]) -> anyhow::Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log_level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    attr[48..48 + 9].copy_from_slice(b"ctrace_ct"); // prog_name
    put_u32(&mut attr, 68, attach_type); // expected_attach_type
    sys_bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&log[..end]);
        anyhow!(
            "BPF_PROG_LOAD: {e}; verifier: {}",
            text.trim().lines().last().unwrap_or("no log")
        )
    })
}

/// BPF_LINK_CREATE with `link_create.netfilter = { pf, hooknum, priority, flags: 0 }`.
fn link_create(prog: RawFd, attach_type: u32, pf: u32, hook: u32, priority: i32) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, prog as u32);
    put_u32(&mut attr, 8, attach_type);
    put_u32(&mut attr, 16, pf);
    put_u32(&mut attr, 20, hook);
    put_u32(&mut attr, 24, priority as u32);
    sys_bpf(BPF_LINK_CREATE, &mut attr)
        .with_context(|| format!("BPF_LINK_CREATE netfilter pf {pf} hook {hook} priority {priority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every jump of both programs lands on the shared `r0 = NF_ACCEPT; exit`.
    #[test]
    fn jumps_land_on_the_exit() {
        for p in [clear_program(3), mark_program(3, 0x70)] {
            let accept = p.len() - 2;
            assert_eq!(
                (p[accept].code, p[accept].imm, p[accept + 1].code),
                (MOV_K, NF_ACCEPT, EXIT)
            );
            let jumps: Vec<usize> = (0..p.len()).filter(|&i| matches!(p[i].code, JEQ_K | JNE_K)).collect();
            assert_eq!(jumps.len(), 1);
            assert_eq!(jumps[0] + 1 + p[jumps[0]].off as usize, accept);
        }
        let p = mark_program(3, 0x70);
        assert_eq!(
            (p[1].code, p[1].off, p[1].regs),
            (LDX_DW, 0x70, 2 | 6 << 4),
            "r2 = skb->_nfct"
        );
    }

    #[test]
    fn encodes_registers_and_map_loads() {
        let mut a = Asm::default();
        a.op(LDX_DW, R2, R6, 0x70, 0).ld_map(R1, 42);
        let p = a.finish();
        assert_eq!((p[0].regs & 0xf, p[0].regs >> 4), (2, 6));
        assert_eq!(size_of::<Insn>(), 8);
        assert_eq!(
            (p[1].code, p[1].regs, p[1].imm, p[2].code),
            (LD_IMM64, 1 | 1 << 4, 42, 0)
        );
    }
}
