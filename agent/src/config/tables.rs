//! Taking `[[sources]]` and `[[sinks]]` tables apart: their `kind`, and their keys
//! split among the structs that read them.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::located::{Located, located};

/// What `kind` a `[[sources]]` or `[[sinks]]` table says.
#[derive(Deserialize)]
struct KindOnly<'a> {
    #[serde(borrow)]
    kind: Option<Spanned<std::borrow::Cow<'a, str>>>,
}

/// Removes `key` from the root table and returns its tables, each with its span.
pub(super) fn take_array<'i>(
    root: &mut DeTable<'i>,
    key: &str,
) -> Result<Vec<Spanned<DeValue<'i>>>, Located> {
    let Some(value) = root.remove(key) else {
        return Ok(Vec::new());
    };
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => Ok(items.iter().cloned().collect()),
        _ => Err((
            Some(span),
            format!("`{key}` must be an array of tables: write [[{key}]]"),
        )),
    }
}

/// Reads the `kind` of a source or sink table, with its span for errors.
pub(super) fn kind_of<'i>(
    table: &Spanned<DeValue<'i>>,
    what: &str,
    kinds: &str,
) -> Result<String, Located> {
    let kind = KindOnly::deserialize(ValueDeserializer::from(table.clone())).map_err(located)?;
    match kind.kind {
        Some(kind) => Ok(kind.into_inner().into_owned()),
        None => Err((
            Some(table.span()),
            format!("this [[{what}]] has no `kind`; expected one of {kinds}"),
        )),
    }
}

/// Deserializes `T` from a table after removing its `kind` key.
pub(super) fn without_kind<'de, T: Deserialize<'de>>(
    table: Spanned<DeValue<'de>>,
) -> Result<T, Located> {
    let span = table.span();
    let mut value = table.into_inner();
    if let DeValue::Table(t) = &mut value {
        t.remove("kind");
    }
    T::deserialize(ValueDeserializer::from(Spanned::new(span, value))).map_err(located)
}

/// Splits a table's keys among `N` structs by their field names; a key none of them has
/// is an error at that key, listing every key the kind accepts.
pub(super) fn split_table<'i, const N: usize>(
    table: Spanned<DeValue<'i>>,
    groups: [&[&str]; N],
    what: &str,
    kind: &str,
) -> Result<[Spanned<DeValue<'i>>; N], Located> {
    let span = table.span();
    let mut out: [DeTable<'i>; N] = std::array::from_fn(|_| DeTable::new());
    if let DeValue::Table(entries) = table.into_inner() {
        for (key, value) in entries {
            let name: &str = key.get_ref();
            if name == "kind" {
                continue;
            }
            match groups.iter().position(|g| g.contains(&name)) {
                Some(i) => {
                    out[i].insert(key, value);
                }
                None => {
                    let mut known: Vec<&str> =
                        groups.iter().flat_map(|g| g.iter().copied()).collect();
                    known.sort_unstable();
                    let known: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                    return Err((
                        Some(key.span()),
                        format!(
                            "unknown key `{name}` for a {what} of kind {kind:?}; expected one of {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    Ok(out.map(|t| Spanned::new(span.clone(), DeValue::Table(t))))
}

/// The field names a struct's `Deserialize` asks for.
pub(super) fn field_names<T: de::DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldProbe) {
        Err(FieldList(fields)) => fields,
        Ok(_) => &[],
    }
}

/// A deserializer that only learns which fields a struct has.
struct FieldProbe;

#[derive(Debug)]
struct FieldList(&'static [&'static str]);

impl fmt::Display for FieldList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fields {:?}", self.0)
    }
}

impl std::error::Error for FieldList {}

impl de::Error for FieldList {
    fn custom<T: fmt::Display>(_: T) -> Self {
        FieldList(&[])
    }
}

impl<'de> Deserializer<'de> for FieldProbe {
    type Error = FieldList;

    fn deserialize_any<V: de::Visitor<'de>>(self, _: V) -> Result<V::Value, FieldList> {
        Err(FieldList(&[]))
    }

    fn deserialize_struct<V: de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, FieldList> {
        Err(FieldList(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}
