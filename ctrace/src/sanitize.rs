//! Strings that come from the kernel (process names, module names) are attacker-controlled:
//! a process can name itself with terminal escape sequences. Print only safe characters.

/// Decodes a NUL-terminated kernel buffer and replaces control and non-ASCII bytes with `?`.
pub fn kernel_str(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    buf[..end]
        .iter()
        .map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_nul_and_masks_escapes() {
        assert_eq!(kernel_str(b"python3\0junk"), "python3");
        assert_eq!(kernel_str(b"\x1b[31mred\x07"), "?[31mred?");
        assert_eq!(kernel_str("caf\u{e9}".as_bytes()), "caf??");
        assert_eq!(kernel_str(b""), "");
    }
}
