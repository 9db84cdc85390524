//! The README's JSON Lines schema table, generated from the record types: each row is one record type, each
//! field its serialised name and its doc comment. A unit test compares the README with it, so a field added,
//! renamed or re-documented in the code without the README (or the other way round) fails the build's tests.
//! `CTRACE_BLESS=1 cargo test -p ctrace readme_schema` rewrites the README's table.

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings};
use serde_json::Value;

use super::{
    AggregatedDrops, CountedDrops, ModeRecord, ModuleRecord, NoticeRecord, PacketDrop, ReattachedRecord, SummaryRecord,
    SysctlResetRecord, SysctlWriteRecord,
};

/// The markers around the generated table in the README.
pub const BEGIN: &str = "<!-- json-schema:begin (generated from ctrace/src/report by `CTRACE_BLESS=1 cargo test -p ctrace readme_schema`) -->";
pub const END: &str = "<!-- json-schema:end -->";

/// (event, which record of that event, its schema), in the README's order.
fn rows() -> Vec<(&'static str, &'static str, Schema)> {
    fn schema<T: JsonSchema>() -> Schema {
        // Inline nested types: the table shows their fields in place.
        SchemaGenerator::new(SchemaSettings::draft2020_12().with(|s| s.inline_subschemas = true))
            .into_root_schema_for::<T>()
    }
    vec![
        ("mode", "", schema::<ModeRecord>()),
        ("drop", "one packet, or one evicted entry", schema::<PacketDrop>()),
        ("drop", "aggregated", schema::<AggregatedDrops>()),
        ("drop", "from counters", schema::<CountedDrops>()),
        ("module", "", schema::<ModuleRecord>()),
        ("sysctl_reset", "", schema::<SysctlResetRecord>()),
        ("sysctl_write", "", schema::<SysctlWriteRecord>()),
        ("reattached", "", schema::<ReattachedRecord>()),
        ("notice", "", schema::<NoticeRecord>()),
        ("summary", "exactly one, at exit", schema::<SummaryRecord>()),
    ]
}

/// Doc comments as one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The object schema inside `v` (arrays: their items; optionals: the non-null branch).
fn object_of(v: &Value) -> Option<&Value> {
    if v.get("properties").is_some() {
        return Some(v);
    }
    if let Some(items) = v.get("items") {
        return object_of(items);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(branches) = v.get(key).and_then(Value::as_array)
            && let Some(found) = branches.iter().find_map(object_of)
        {
            return Some(found);
        }
    }
    None
}

/// `name` (doc) for each field; nested objects list their own fields in braces.
fn fields(v: &Value) -> Vec<String> {
    let Some(props) = object_of(v)
        .and_then(|o| o.get("properties"))
        .and_then(Value::as_object)
    else {
        return vec![];
    };
    props
        .iter()
        .filter(|(name, _)| *name != "ts")
        .map(|(name, p)| {
            let doc = p.get("description").and_then(Value::as_str).map(one_line);
            let nested = fields(p);
            let nested = if nested.is_empty() {
                String::new()
            } else {
                let array = p.get("type") == Some(&Value::from("array"))
                    || p.get("anyOf").is_some_and(|b| b.to_string().contains("\"array\""));
                let inner = nested.join(", ");
                if array {
                    format!(": [{{{inner}}}]")
                } else {
                    format!(": {{{inner}}}")
                }
            };
            match doc {
                Some(d) if !d.is_empty() => format!("`{name}` ({d}){nested}"),
                _ => format!("`{name}`{nested}"),
            }
        })
        .collect()
}

/// The table, between (not including) the markers.
pub fn markdown_table() -> String {
    let mut out = String::from("| event | fields |\n|---|---|\n");
    for (event, which, schema) in rows() {
        let value = schema.as_value();
        let label = if which.is_empty() {
            format!("`{event}`")
        } else {
            format!("`{event}` ({which})")
        };
        let what = value
            .get("description")
            .and_then(Value::as_str)
            .map(one_line)
            .unwrap_or_default();
        out.push_str(&format!("| {label} | {what} {} |\n", fields(value).join(", ")).replace("  ", " "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_schema_table_matches_the_record_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (Some(begin), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
            panic!("README.md has no {BEGIN} ... {END} section");
        };
        let current = &readme[begin + BEGIN.len()..end];
        let wanted = format!("\n{}", markdown_table());
        if current == wanted {
            return;
        }
        if std::env::var_os("CTRACE_BLESS").is_some() {
            let updated = format!("{}{wanted}{}", &readme[..begin + BEGIN.len()], &readme[end..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        panic!(
            "the README's JSON Lines table differs from the record types in ctrace/src/report; if the types are \
             right, run `CTRACE_BLESS=1 cargo test -p ctrace readme_schema`. Generated:\n{wanted}"
        );
    }

    #[test]
    fn every_serialised_field_is_in_the_schema() {
        // The schema is derived from the types; this guards the serde attributes it cannot see through.
        let d = crate::report::drop::tests::sample_drop();
        let packet = PacketDrop::new(
            time::OffsetDateTime::UNIX_EPOCH,
            &d,
            &crate::report::drop::tests::blue_ctx(),
        );
        let v = serde_json::to_value(&packet).unwrap();
        let table = markdown_table();
        for key in v.as_object().unwrap().keys().filter(|k| *k != "ts") {
            assert!(
                table.contains(&format!("`{key}`")),
                "{key} is serialised but not documented"
            );
        }
    }
}
