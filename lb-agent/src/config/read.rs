//! Reading a TOML document into a typed model with every mistake reported at once.
//!
//! The document is parsed with spans kept ([`toml::de::DeTable`]) and handed to the
//! model's own `Deserialize` through a deserializer over the spanned values, so the
//! model alone decides the keys of each table (serde's field list), their types and
//! their defaults. What this module adds is the reporting:
//!
//! - an unknown key is reported (with a "did you mean" when one is close) and skipped;
//! - a value of the wrong type or out of range is reported at the value, in words a
//!   user reads ("expected an integer between 0 and 65535, found 70000");
//! - a missing required key is reported at the table that lacks it.
//!
//! A derived `Deserialize` stops at the first error, so reading is repeated: after
//! each error the value at fault is left out (its key then takes its default), or,
//! for a missing required key, the whole table (an array element is then left out of
//! its array, an optional table is absent). Errors that only follow from something
//! left out are not reported again. The read ends when the model deserializes.
//!
//! The spans of all keys are kept, so that errors found later on the model (rules)
//! can be placed by key path: [`Read::place`].

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

type Span = Range<usize>;
type Value<'i> = Spanned<DeValue<'i>>;

/// What reading a document gave.
pub(super) struct Read<'s, T> {
    /// The model, with defaults where a value was left out; `None` only when the
    /// document as a whole could not be read.
    pub(super) value: Option<T>,
    /// The errors found while reading, placed in the file.
    pub(super) errors: Vec<ConfigError>,
    text: &'s str,
    origin: &'s str,
    /// Span of every key path met (the key, or an array element's table).
    spans: HashMap<String, Span>,
    /// For each array read into the model: the file index of each element kept.
    elements: HashMap<String, Vec<usize>>,
}

impl<T> Read<'_, T> {
    /// The file index of each element of the array at key path `array` that is in
    /// the model, in order (empty when the array is absent).
    pub(super) fn file_indices(&self, array: &str) -> Vec<usize> {
        self.elements.get(array).cloned().unwrap_or_default()
    }

    /// Sets the file, line and column of an error found on the model: those of its
    /// key, or of its nearest ancestor in the file (a key left to its default points
    /// at the table that omits it).
    pub(super) fn place(&self, error: &mut ConfigError) {
        self.origin.clone_into(&mut error.file);
        if let Some(span) = find_span(&self.spans, &error.key) {
            let (line, column) = position(self.text, span.start);
            error.line = Some(line);
            error.column = Some(column);
        }
    }
}

/// Reads `root` (parsed from `text`) into a `T`, collecting every error.
pub(super) fn read<'s, T: DeserializeOwned>(
    root: &Spanned<DeTable<'_>>,
    text: &'s str,
    origin: &'s str,
) -> Read<'s, T> {
    let root = Spanned::new(root.span(), DeValue::Table(root.get_ref().clone()));
    let mut ctx = Ctx {
        text,
        origin,
        left_out: HashSet::new(),
        found: RefCell::new(Found::default()),
    };
    let value = loop {
        let de = ValueDe {
            ctx: &ctx,
            value: &root,
            path: String::new(),
        };
        match T::deserialize(de) {
            Ok(value) => break Some(value),
            Err(Error::Reported) => {}
            Err(Error::Invalid(message)) => {
                ctx.report(&root.span(), "", message);
                break None;
            }
            Err(Error::Missing(key)) => {
                ctx.report(&root.span(), key, "required key is missing".to_owned());
                break None;
            }
        }
        // Each attempt leaves out one more key path, so this ends.
        match ctx.found.get_mut().leave_out.take() {
            Some(path) if !path.is_empty() && !ctx.left_out.contains(&path) => {
                ctx.left_out.insert(path);
            }
            _ => break None,
        }
    };
    let found = ctx.found.into_inner();
    Read {
        value,
        errors: found.errors,
        text,
        origin,
        spans: found.spans,
        elements: found.elements,
    }
}

/// State shared by one read's deserializers.
struct Ctx<'s> {
    text: &'s str,
    origin: &'s str,
    /// Key paths left out after an error, in this and the coming attempts.
    left_out: HashSet<String>,
    found: RefCell<Found>,
}

#[derive(Default)]
struct Found {
    errors: Vec<ConfigError>,
    spans: HashMap<String, Span>,
    elements: HashMap<String, Vec<usize>>,
    /// What the failed attempt asks to leave out next.
    leave_out: Option<String>,
}

impl Ctx<'_> {
    /// Records an error (once: later attempts meet the same unknown keys again).
    fn report(&self, span: &Span, key: &str, message: String) {
        let (line, column) = position(self.text, span.start);
        let error = ConfigError {
            file: self.origin.to_owned(),
            line: Some(line),
            column: Some(column),
            key: key.to_owned(),
            message,
        };
        let errors = &mut self.found.borrow_mut().errors;
        if !errors.contains(&error) {
            errors.push(error);
        }
    }

    fn span(&self, path: String, span: Span) {
        self.found.borrow_mut().spans.insert(path, span);
    }

    /// Deserializes `value` (at key path `path`) with `seed`. On an error there,
    /// reports it and asks for `leave_out` to be left out in the next attempt.
    fn value<'de, S: DeserializeSeed<'de>>(
        &self,
        seed: S,
        value: &Value<'_>,
        path: String,
        leave_out: String,
    ) -> Result<S::Value, Error> {
        let de = ValueDe {
            ctx: self,
            value,
            path: path.clone(),
        };
        match seed.deserialize(de) {
            Ok(v) => return Ok(v),
            Err(Error::Reported) => return Err(Error::Reported),
            Err(Error::Invalid(message)) => self.report(&value.span(), &path, message),
            Err(Error::Missing(key)) => {
                let key = join(&path, key);
                // Absent because an earlier attempt left it out: already reported.
                if !self.left_out.contains(&key) {
                    self.report(&value.span(), &key, "required key is missing".to_owned());
                }
            }
        }
        self.found.borrow_mut().leave_out.get_or_insert(leave_out);
        Err(Error::Reported)
    }
}

/// Errors inside one attempt.
#[derive(Debug)]
enum Error {
    /// Reported already; the attempt stops.
    Reported,
    /// The value at hand is wrong, for this reason (placed by the caller).
    Invalid(String),
    /// The table at hand lacks this required key.
    Missing(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reported => f.write_str("reported"),
            Self::Invalid(message) => f.write_str(message),
            Self::Missing(key) => write!(f, "missing key {key}"),
        }
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self::Invalid(message.to_string())
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::Invalid(format!("expected {expected}, found {unexpected}"))
    }

    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::Invalid(format!("expected {expected}, found {unexpected}"))
    }

    fn invalid_length(len: usize, expected: &dyn Expected) -> Self {
        Self::Invalid(format!("expected {expected}, found {len} values"))
    }

    fn missing_field(field: &'static str) -> Self {
        Self::Missing(field)
    }
}

/// Deserializer of one spanned value at a key path.
struct ValueDe<'a, 's, 'i> {
    ctx: &'a Ctx<'s>,
    value: &'a Value<'i>,
    path: String,
}

impl ValueDe<'_, '_, '_> {
    fn get(&self) -> &DeValue<'_> {
        self.value.get_ref()
    }

    /// "expected `expected`, found a boolean".
    fn wrong_type(&self, expected: &str) -> Error {
        let found = self.get().type_str();
        Error::Invalid(format!(
            "expected {expected}, found {} {found}",
            article(found)
        ))
    }

    fn integer(&self, min: i128, max: i128) -> Result<i128, Error> {
        let DeValue::Integer(int) = self.get() else {
            return Err(self.wrong_type("an integer"));
        };
        let n = i128::from_str_radix(int.as_str(), int.radix());
        match n {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => {
                let found = n.map_or_else(|_| int.to_string(), |n| n.to_string());
                Err(Error::Invalid(format!(
                    "expected an integer between {min} and {max}, found {found}"
                )))
            }
        }
    }

    fn float(&self) -> Result<f64, Error> {
        match self.get() {
            DeValue::Float(f) => f.as_str().parse().map_err(de::Error::custom),
            DeValue::Integer(_) => self.integer(i128::MIN, i128::MAX).map(|n| n as f64),
            _ => Err(self.wrong_type("a number")),
        }
    }

    fn string(&self) -> Result<&str, Error> {
        match self.get() {
            DeValue::String(s) => Ok(s),
            _ => Err(self.wrong_type("a string")),
        }
    }

    fn table(&self, fields: Option<&[&str]>) -> Result<Entries<'_, '_, '_>, Error> {
        let DeValue::Table(table) = self.get() else {
            return Err(self.wrong_type("a table"));
        };
        let mut entries = Vec::new();
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let path = join(&self.path, name);
            self.ctx.span(path.clone(), key.span());
            if let Some(known) = fields.filter(|known| !known.contains(&name)) {
                let message = match suggest(name, known.iter().copied()) {
                    Some(near) => format!("unknown key `{name}`; did you mean `{near}`?"),
                    None => format!(
                        "unknown key `{name}`; expected one of: {}",
                        known.join(", ")
                    ),
                };
                self.ctx.report(&key.span(), &path, message);
            } else if !self.ctx.left_out.contains(&path) {
                entries.push((name, value, path));
            }
        }
        Ok(Entries {
            ctx: self.ctx,
            entries: entries.into_iter(),
            value: None,
        })
    }

    fn array(&self) -> Result<Elements<'_, '_, '_>, Error> {
        let DeValue::Array(items) = self.get() else {
            return Err(self.wrong_type("an array"));
        };
        self.ctx
            .found
            .borrow_mut()
            .elements
            .insert(self.path.clone(), Vec::new());
        Ok(Elements {
            ctx: self.ctx,
            items: items.iter().enumerate(),
            path: &self.path,
        })
    }
}

macro_rules! integers {
    ($($method:ident $t:ty => $visit:ident $as:ty;)+) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let n = self.integer(i128::from(<$t>::MIN), i128::from(<$t>::MAX))?;
            // In range: checked just above.
            visitor.$visit(n as $as)
        }
    )+};
}

impl<'de> de::Deserializer<'de> for ValueDe<'_, '_, '_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.get() {
            DeValue::String(s) => visitor.visit_str(s),
            DeValue::Integer(_) => {
                let n = self.integer(i128::from(i64::MIN), i128::from(u64::MAX))?;
                match i64::try_from(n) {
                    Ok(n) => visitor.visit_i64(n),
                    Err(_) => visitor.visit_u64(u64::try_from(n).map_err(de::Error::custom)?),
                }
            }
            DeValue::Float(_) => visitor.visit_f64(self.float()?),
            DeValue::Boolean(b) => visitor.visit_bool(*b),
            DeValue::Datetime(d) => visitor.visit_string(d.to_string()),
            DeValue::Array(_) => visitor.visit_seq(self.array()?),
            DeValue::Table(_) => visitor.visit_map(self.table(None)?),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.get() {
            DeValue::Boolean(b) => visitor.visit_bool(*b),
            _ => Err(self.wrong_type("a boolean")),
        }
    }

    integers! {
        deserialize_i8 i8 => visit_i8 i8;
        deserialize_i16 i16 => visit_i16 i16;
        deserialize_i32 i32 => visit_i32 i32;
        deserialize_i64 i64 => visit_i64 i64;
        deserialize_i128 i128 => visit_i128 i128;
        deserialize_u8 u8 => visit_u8 u8;
        deserialize_u16 u16 => visit_u16 u16;
        deserialize_u32 u32 => visit_u32 u32;
        deserialize_u64 u64 => visit_u64 u64;
    }

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let n = self.integer(0, i128::MAX)?;
        visitor.visit_u128(u128::try_from(n).map_err(de::Error::custom)?)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f64(self.float()?)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    /// A string; when the type then rejects it (an address that does not parse), the
    /// error says what form was expected.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let s = self.string()?;
        let expected = form(&visitor);
        visitor.visit_str(s).map_err(|e| match e {
            Error::Invalid(_) => Error::Invalid(format!("expected {expected}, found \"{s}\"")),
            other => other,
        })
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }

    /// TOML has no null: a value that is there is `Some`.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        Err(self.wrong_type("nothing"))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(self.array()?)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(self.table(None)?)
    }

    /// A table whose known keys are the struct's fields.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_map(self.table(Some(fields))?)
    }

    /// A unit variant, spelled as a string: one of `variants`.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let s = self.string()?;
        if variants.contains(&s) {
            return visitor.visit_enum(s.into_deserializer());
        }
        let mut message = format!(
            "unknown value \"{s}\", expected one of: {}",
            variants.join(", ")
        );
        if let Some(near) = suggest(s, variants.iter().copied()) {
            message = format!("{message}; did you mean \"{near}\"?");
        }
        Err(Error::Invalid(message))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

/// The entries of a table, known keys only.
struct Entries<'a, 's, 'i> {
    ctx: &'a Ctx<'s>,
    entries: std::vec::IntoIter<(&'a str, &'a Value<'i>, String)>,
    value: Option<(&'a Value<'i>, String)>,
}

impl<'de> MapAccess<'de> for Entries<'_, '_, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((name, value, path)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((value, path));
        seed.deserialize(name.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (value, path) = self
            .value
            .take()
            .ok_or_else(|| Error::Invalid("a value without its key".to_owned()))?;
        self.ctx.value(seed, value, path.clone(), path)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// The elements of an array, each at `path[i]`.
struct Elements<'a, 's, 'i> {
    ctx: &'a Ctx<'s>,
    items: std::iter::Enumerate<std::slice::Iter<'a, Value<'i>>>,
    path: &'a str,
}

impl<'de> SeqAccess<'de> for Elements<'_, '_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        for (i, item) in self.items.by_ref() {
            let path = format!("{}[{i}]", self.path);
            self.ctx.span(path.clone(), item.span());
            if self.ctx.left_out.contains(&path) {
                continue;
            }
            // A table is an entry of its own (a service, a backend) and is left out
            // alone; a bad scalar spoils the whole array (`[low, high]`).
            let leave_out = if matches!(item.get_ref(), DeValue::Table(_)) {
                path.clone()
            } else {
                self.path.to_owned()
            };
            let value = self.ctx.value(seed, item, path, leave_out)?;
            if let Some(kept) = self.ctx.found.borrow_mut().elements.get_mut(self.path) {
                kept.push(i);
            }
            return Ok(Some(value));
        }
        Ok(None)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// What a visitor expects, for a user: "an IP address".
fn form(expected: &dyn Expected) -> String {
    let what = expected.to_string();
    match what.as_str() {
        "socket address" => {
            "an address:port such as \"198.18.100.1:80\" or \"[fd00:18::1]:80\"".to_owned()
        }
        w if w.starts_with("a ") || w.starts_with("an ") => what,
        w => format!("{} {w}", article(w)),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The closest of `candidates` to `word`, if close enough to be a likely typo.
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting an insertion, deletion, substitution or swap of two
/// neighbours as one (optimal string alignment), with `-` and `_` taken as equal.
fn edit_distance(a: &str, b: &str) -> usize {
    let norm = |c: char| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_lowercase()
        }
    };
    let a: Vec<char> = a.chars().map(norm).collect();
    let b: Vec<char> = b.chars().map(norm).collect();
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The recorded span of `key`, or of its nearest recorded ancestor.
fn find_span<'a>(spans: &'a HashMap<String, Span>, mut key: &str) -> Option<&'a Span> {
    loop {
        if let Some(span) = spans.get(key) {
            return Some(span);
        }
        key = &key[..key.rfind(['.', '['])?];
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}
