//! The kernel side's setup: the offsets the module programs read (from BTF, and from tracefs `format` files for
//! the delete_module syscall tracepoints, whose fields are read, not assumed) and their attaching.

use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{BtfTracePoint, TracePoint},
};
use ctrace_common::ModuleLayout;

use crate::btf::Btf;

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Whether modules can come and go on this kernel at all.
pub fn kernel_has_modules() -> bool {
    Path::new("/proc/modules").exists()
}

/// Resolves the offsets the module programs need. `tracefs` is where the syscall tracepoints'
/// `format` files are (their field offsets are read, not assumed); when it cannot be read the second value is
/// false and only the delete_module tracepoints go unwatched.
pub fn layout(btf: &Btf, tracefs: &Path) -> anyhow::Result<(ModuleLayout, bool)> {
    let off = |s: &str, p: &str| btf.member_offset(s, p);
    let field = |event: &str, name: &str| -> anyhow::Result<u32> {
        let path = tracefs.join("events/syscalls").join(event).join("format");
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        format_offset(&text, name).ok_or_else(|| anyhow!("{} has no field {name}", path.display()))
    };
    let delete = field("sys_enter_delete_module", "name_user").and_then(|name| {
        let ret = field("sys_exit_delete_module", "ret")?;
        Ok((name, ret))
    });
    let syscalls = delete.is_ok();
    let (delete_enter_name, delete_exit_ret) = delete.unwrap_or((16, 16));
    let layout = ModuleLayout {
        module_name: off("module", "name")?,
        task_real_parent: off("task_struct", "real_parent")?,
        task_tgid: off("task_struct", "tgid")?,
        task_comm: off("task_struct", "comm")?,
        task_mm: off("task_struct", "mm")?,
        mm_arg_start: off("mm_struct", "arg_start")?,
        mm_arg_end: off("mm_struct", "arg_end")?,
        delete_enter_name,
        delete_exit_ret,
        task_exit_code: off("task_struct", "exit_code")?,
        task_cred: off("task_struct", "cred")?,
        cred_cap_effective: off("cred", "cap_effective")?,
        cred_user_ns: off("cred", "user_ns")?,
        user_ns_level: off("user_namespace", "level")?,
        // `real_start_time` before 5.5.
        task_start_boottime: off("task_struct", "start_boottime").or_else(|_| off("task_struct", "real_start_time"))?,
        task_group_leader: off("task_struct", "group_leader")?,
    };
    Ok((layout, syscalls))
}

/// Offset of `name` in a tracefs `format` file (`field:const char * name_user; offset:16; size:8; signed:0;`,
/// tab-separated).
fn format_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let field_name = decl.split_whitespace().last()?.trim_start_matches('*');
        if field_name != name {
            return None;
        }
        let off = line.split(';').find_map(|p| p.trim().strip_prefix("offset:"))?;
        off.trim().parse().ok()
    })
}

/// Attaches the module programs (loaded with `layout` already set as a global); the delete_module tracepoints
/// only with `syscalls` (they need perf events and tracefs). Returns whether those are attached.
pub fn attach(ebpf: &mut Ebpf, btf: &aya::Btf, syscalls: bool) -> anyhow::Result<bool> {
    for (prog, tp) in [
        ("module_load", "module_load"),
        ("module_free", "module_free"),
        ("module_tool_exec", "sched_process_exec"),
        ("module_tool_exit", "sched_process_exit"),
    ] {
        let p: &mut BtfTracePoint = ebpf.program_mut(prog).context("module program missing")?.try_into()?;
        p.load(tp, btf)
            .with_context(|| format!("cannot load the {tp} BTF tracepoint program"))?;
        p.attach().with_context(|| format!("cannot attach to module:{tp}"))?;
    }
    if !syscalls {
        return Ok(false);
    }
    for (prog, tp) in [
        ("module_delete_enter", "sys_enter_delete_module"),
        ("module_delete_exit", "sys_exit_delete_module"),
    ] {
        let p: &mut TracePoint = ebpf.program_mut(prog).context("module program missing")?.try_into()?;
        p.load()?;
        p.attach("syscalls", tp)
            .with_context(|| format!("cannot attach to syscalls:{tp}"))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tracefs_format_offsets() {
        let fmt = "name: sys_enter_delete_module\nID: 700\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:const char * name_user;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned int flags;\toffset:24;\tsize:8;\tsigned:0;\n";
        assert_eq!(format_offset(fmt, "name_user"), Some(16));
        assert_eq!(format_offset(fmt, "flags"), Some(24));
        assert_eq!(format_offset(fmt, "nope"), None);
    }
}
