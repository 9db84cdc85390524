//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux` and a module's split BTF
//! such as `/sys/kernel/btf/nf_conntrack`).
//!
//! Rust eBPF has no CO-RE relocations, so ctrace resolves the few field offsets and enum
//! values its programs need here, at start-up, from the running kernel. Only what is needed is
//! decoded: names, struct/union members (through anonymous members), enums and functions.

use std::{collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no {kind} named `{name}`")]
    NoType { kind: &'static str, name: String },
    #[error("kernel BTF: `{ty}` has no member `{member}`")]
    NoMember { ty: String, member: String },
    #[error("kernel BTF: member `{ty}.{member}` is a bitfield, not addressable")]
    Bitfield { ty: String, member: String },
    #[error("kernel BTF: enum `{ty}` has no value `{name}`")]
    NoEnumValue { ty: String, name: String },
}

const BTF_MAGIC: u16 = 0xeb9f;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(v: u32) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            0 => Void,
            1 => Int,
            2 => Ptr,
            3 => Array,
            4 => Struct,
            5 => Union,
            6 => Enum,
            7 => Fwd,
            8 => Typedef,
            9 => Volatile,
            10 => Const,
            11 => Restrict,
            12 => Func,
            13 => FuncProto,
            14 => Var,
            15 => Datasec,
            16 => Float,
            17 => DeclTag,
            18 => TypeTag,
            19 => Enum64,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Member {
    pub name: u32,
    pub type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    pub bit_offset: u32,
    /// Non-zero for bitfields.
    pub bitfield_size: u32,
}

#[derive(Clone, Debug)]
pub struct Type {
    pub name: u32,
    pub kind: Kind,
    /// `size` for sized kinds, `type` for reference kinds.
    pub size_or_type: u32,
    pub members: Vec<Member>,
    /// (name, value) for enums.
    pub values: Vec<(u32, i64)>,
}

/// Parsed BTF: a base (vmlinux) optionally extended by one module's split BTF.
#[derive(Clone, Debug)]
pub struct Btf {
    /// Index = type id; id 0 is void.
    types: Vec<Type>,
    /// Concatenated string sections (base first), so split string offsets index directly.
    strings: Vec<u8>,
    by_name: HashMap<(String, u8), Vec<u32>>,
}

fn rd_u32(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's BTF. A kernel without it cannot be traced (offsets are unknown).
    pub fn vmlinux() -> Result<Btf, BtfError> {
        Btf::from_file("/sys/kernel/btf/vmlinux")
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Btf, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data, None)
    }

    /// A module's split BTF (e.g. `/sys/kernel/btf/nf_conntrack`) on top of this vmlinux BTF.
    pub fn with_split_file(&self, path: impl AsRef<Path>) -> Result<Btf, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data, Some(self))
    }

    pub fn parse(data: &[u8], base: Option<&Btf>) -> Result<Btf, BtfError> {
        if data.len() < 24 {
            return Err(BtfError::Malformed("shorter than the header"));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (big-endian BTF is not supported)"));
        }
        let hdr_len = rd_u32(data, 4)? as usize;
        let type_off = rd_u32(data, 8)? as usize;
        let type_len = rd_u32(data, 12)? as usize;
        let str_off = rd_u32(data, 16)? as usize;
        let str_len = rd_u32(data, 20)? as usize;
        let types_sec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let str_sec = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;

        let (mut types, mut strings) = match base {
            Some(b) => (b.types.clone(), b.strings.clone()),
            None => (
                vec![Type {
                    name: 0,
                    kind: Kind::Void,
                    size_or_type: 0,
                    members: vec![],
                    values: vec![],
                }],
                Vec::new(),
            ),
        };
        let first_new = types.len();
        strings.extend_from_slice(str_sec);

        let mut off = 0usize;
        while off < types_sec.len() {
            let name = rd_u32(types_sec, off)?;
            let info = rd_u32(types_sec, off + 4)?;
            let size_or_type = rd_u32(types_sec, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 != 0;
            let kind = Kind::from_raw((info >> 24) & 0x1f).ok_or(BtfError::Malformed("unknown kind"))?;
            let mut ty = Type {
                name,
                kind,
                size_or_type,
                members: vec![],
                values: vec![],
            };
            match kind {
                Kind::Int | Kind::Var | Kind::DeclTag => off += 4,
                Kind::Array => off += 12,
                Kind::Struct | Kind::Union => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw_off = rd_u32(types_sec, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (raw_off & 0xff_ffff, raw_off >> 24)
                        } else {
                            (raw_off, 0)
                        };
                        ty.members.push(Member {
                            name: rd_u32(types_sec, m)?,
                            type_id: rd_u32(types_sec, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    off += vlen * 12;
                }
                Kind::Enum => {
                    for i in 0..vlen {
                        let e = off + i * 8;
                        let raw = rd_u32(types_sec, e + 4)?;
                        // kind_flag set = signed values.
                        let v = if kind_flag { raw as i32 as i64 } else { raw as i64 };
                        ty.values.push((rd_u32(types_sec, e)?, v));
                    }
                    off += vlen * 8;
                }
                Kind::Enum64 => {
                    for i in 0..vlen {
                        let e = off + i * 12;
                        let lo = rd_u32(types_sec, e + 4)? as u64;
                        let hi = rd_u32(types_sec, e + 8)? as u64;
                        ty.values.push((rd_u32(types_sec, e)?, ((hi << 32) | lo) as i64));
                    }
                    off += vlen * 12;
                }
                Kind::FuncProto => off += vlen * 8,
                Kind::Datasec => off += vlen * 12,
                _ => {}
            }
            if off > types_sec.len() {
                return Err(BtfError::Malformed("type record out of bounds"));
            }
            types.push(ty);
        }

        let mut btf = Btf {
            types,
            strings,
            by_name: base.map(|b| b.by_name.clone()).unwrap_or_default(),
        };
        for id in first_new..btf.types.len() {
            let t = &btf.types[id];
            if t.name != 0 {
                let key = (btf.str(t.name).to_owned(), t.kind as u8);
                btf.by_name.entry(key).or_default().push(id as u32);
            }
        }
        Ok(btf)
    }

    fn str(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    fn ids(&self, name: &str, kind: Kind) -> &[u32] {
        self.by_name
            .get(&(name.to_owned(), kind as u8))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Finds the struct (or union) with a complete definition named `name`.
    fn composite(&self, name: &str) -> Result<u32, BtfError> {
        self.ids(name, Kind::Struct)
            .iter()
            .chain(self.ids(name, Kind::Union))
            .copied()
            .find(|&id| self.ty(id).is_some_and(|t| !t.members.is_empty()))
            .ok_or_else(|| BtfError::NoType {
                kind: "struct",
                name: name.to_owned(),
            })
    }

    /// Byte offset of `path` (dot-separated members, e.g. `__sk_common.skc_net.net`) inside
    /// struct `name`. Members of anonymous structs and unions are found as the C compiler would.
    pub fn member_offset(&self, name: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = self.composite(name)?;
        let mut bits = 0u32;
        let mut ty_name = name.to_owned();
        for member in path.split('.') {
            let (m_bits, m_type, bitfield) = self.find_member(id, member).ok_or_else(|| BtfError::NoMember {
                ty: ty_name.clone(),
                member: member.to_owned(),
            })?;
            if bitfield || m_bits % 8 != 0 {
                return Err(BtfError::Bitfield {
                    ty: ty_name,
                    member: member.to_owned(),
                });
            }
            bits += m_bits;
            id = self.resolve(m_type);
            ty_name = format!("{ty_name}.{member}");
        }
        Ok(bits / 8)
    }

    /// (bit offset, type id, is_bitfield) of `member` in composite `id`, searching anonymous members.
    fn find_member(&self, id: u32, member: &str) -> Option<(u32, u32, bool)> {
        let t = self.ty(id)?;
        for m in &t.members {
            if m.name != 0 {
                if self.str(m.name) == member {
                    return Some((m.bit_offset, m.type_id, m.bitfield_size != 0));
                }
            } else {
                let inner = self.resolve(m.type_id);
                if let Some((off, ty, bf)) = self.find_member(inner, member) {
                    return Some((m.bit_offset + off, ty, bf));
                }
            }
        }
        None
    }

    /// `sizeof(struct name)` (or a union's), e.g. `struct_size("nf_conn")` for the size of one conntrack entry.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self.composite(name)?;
        self.ty(id)
            .map(|t| t.size_or_type)
            .ok_or(BtfError::Malformed("type id out of range"))
    }

    /// Value of enumerator `value` in enum `name`.
    pub fn enum_value(&self, name: &str, value: &str) -> Result<i64, BtfError> {
        let ids: Vec<u32> = self
            .ids(name, Kind::Enum)
            .iter()
            .chain(self.ids(name, Kind::Enum64))
            .copied()
            .collect();
        if ids.is_empty() {
            return Err(BtfError::NoType {
                kind: "enum",
                name: name.to_owned(),
            });
        }
        ids.iter()
            .filter_map(|&id| self.ty(id))
            .flat_map(|t| t.values.iter())
            .find(|(n, _)| self.str(*n) == value)
            .map(|&(_, v)| v)
            .ok_or_else(|| BtfError::NoEnumValue {
                ty: name.to_owned(),
                name: value.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct inner { int a; int b; }; struct outer { long x; union { struct inner in; }; int y:3; };
    /// enum e { A = 7, B = -1 }; func f.
    fn sample() -> Vec<u8> {
        let strs = b"\0int\0inner\0a\0b\0outer\0x\0in\0y\0e\0A\0B\0f\0long\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strs.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        let mut t: Vec<u32> = vec![];
        // 1: int (4 bytes)
        t.extend([s("int"), 1 << 24, 4, 32]);
        // 2: struct inner, 2 members
        t.extend([s("inner"), (4 << 24) | 2, 8, s("a"), 1, 0, s("b"), 1, 32]);
        // 3: anonymous union with member `in`
        t.extend([0, (5 << 24) | 1, 8, s("in"), 2, 0]);
        // 4: long
        t.extend([s("long"), 1 << 24, 8, 64]);
        // 5: struct outer (kind_flag: bitfield encoding)
        t.extend([
            s("outer"),
            (1 << 31) | (4 << 24) | 3,
            24,
            s("x"),
            4,
            0,
            0,
            3,
            64,
            s("y"),
            1,
            (3 << 24) | 128,
        ]);
        // 6: enum e (signed)
        t.extend([s("e"), (1 << 31) | (6 << 24) | 2, 4, s("A"), 7, s("B"), u32::MAX]);
        // 7: func proto, 8: func f
        t.extend([0, 13 << 24, 0]);
        t.extend([s("f"), 12 << 24, 7]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![];
        out.extend(BTF_MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strs.len() as u32] {
            out.extend(v.to_le_bytes());
        }
        out.extend(types);
        out.extend(strs);
        out
    }

    #[test]
    fn resolves_members_through_anonymous_unions() {
        let btf = Btf::parse(&sample(), None).unwrap();
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "in").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in.b").unwrap(), 12);
    }

    #[test]
    fn reports_missing_and_bitfield_members() {
        let btf = Btf::parse(&sample(), None).unwrap();
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "y"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(btf.member_offset("absent", "x"), Err(BtfError::NoType { .. })));
    }

    #[test]
    fn struct_sizes() {
        let btf = Btf::parse(&sample(), None).unwrap();
        assert_eq!(btf.struct_size("outer").unwrap(), 24);
        assert_eq!(btf.struct_size("inner").unwrap(), 8);
        assert!(matches!(btf.struct_size("absent"), Err(BtfError::NoType { .. })));
    }

    #[test]
    fn reads_enums() {
        let btf = Btf::parse(&sample(), None).unwrap();
        assert_eq!(btf.enum_value("e", "A").unwrap(), 7);
        assert_eq!(btf.enum_value("e", "B").unwrap(), -1);
        assert!(btf.enum_value("e", "C").is_err());
    }

    #[test]
    fn split_btf_extends_the_base() {
        let base = Btf::parse(&sample(), None).unwrap();
        // Split BTF: ids continue after the base's 8 types, string offsets after its strings.
        let strs = b"\0split\0z\0";
        let base_strs = base.strings.len() as u32;
        let t: Vec<u32> = vec![base_strs + 1, (4 << 24) | 1, 16, base_strs + 7, 5, 64];
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut blob = vec![];
        blob.extend(BTF_MAGIC.to_le_bytes());
        blob.extend([1u8, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strs.len() as u32] {
            blob.extend(v.to_le_bytes());
        }
        blob.extend(types);
        blob.extend(strs);
        let split = Btf::parse(&blob, Some(&base)).unwrap();
        // Member `z` of the split struct has the base's `outer` type (id 5): in.b is at 8 + 12.
        assert_eq!(split.member_offset("split", "z.in.b").unwrap(), 20);
        assert_eq!(split.member_offset("outer", "x").unwrap(), 0, "base types stay visible");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, definitely not", None).is_err());
        let mut blob = sample();
        blob.truncate(30);
        assert!(Btf::parse(&blob, None).is_err());
    }
}
