//! `jsonb` in and out of evaluation without a text round trip.
//!
//! pgrx's `JsonB` prints every argument to text and parses it again, and
//! does the reverse for results. Evaluation reads a handful of top-level
//! keys of the context and answers with a small object, so it borrows the
//! argument's binary container, looks up only the keys the rules need, and
//! builds its result with `pushJsonbValue`.

use std::ffi::{c_char, c_int, CStr, CString};
use std::mem::MaybeUninit;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::direct_function_call_as_datum;
use pgrx::pg_sys::{self, jbvType, JsonbIteratorToken as Token};
use pgrx::prelude::*;
use serde_json::{Number, Value};

mod numeric;

/// A `jsonb` argument, detoasted but not converted. It borrows the
/// argument's memory, which PostgreSQL keeps for the function call `'fcx`
/// (the argument datum itself, or a detoasted copy palloc'd in the call's
/// memory context): the lifetime keeps it from being stored beyond.
pub struct JsonbArg<'fcx> {
    jsonb: std::ptr::NonNull<pg_sys::Jsonb>,
    call: std::marker::PhantomData<&'fcx pg_sys::Jsonb>,
}

impl JsonbArg<'_> {
    fn root(&self) -> *mut pg_sys::JsonbContainer {
        // SAFETY: `jsonb` points to a complete, detoasted Jsonb with a 4-byte
        // header, valid for 'fcx; taking a field's address reads nothing.
        unsafe { std::ptr::addr_of_mut!((*self.jsonb.as_ptr()).root) }
    }

    /// The size of its binary form, in bytes.
    pub fn size_bytes(&self) -> usize {
        // SAFETY: a complete, detoasted Jsonb (see `root`).
        unsafe { pgrx::varsize_any_exhdr(self.jsonb.as_ptr().cast()) }
    }

    /// A JSON object at the top (not an array, not a raw scalar).
    pub fn is_object(&self) -> bool {
        // SAFETY: `root` points into a complete Jsonb (see `root`), which
        // always has at least its root header word.
        let header = unsafe { (*self.root()).header };
        header & pg_sys::JB_FOBJECT != 0
    }

    /// The whole document as JSON text (for the evaluation log).
    pub fn to_text(&self) -> String {
        // SAFETY: JsonbToCString reads the complete container and returns a
        // palloc'd, NUL-terminated string, copied before anything frees it.
        // It can raise (out of memory) through the guarded binding, with no
        // Rust value owning anything yet.
        unsafe {
            let text = pg_sys::JsonbToCString(
                std::ptr::null_mut(),
                self.root(),
                pgrx::varsize_any_exhdr(self.jsonb.as_ptr().cast()) as c_int,
            );
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        }
    }

    /// The whole document as a `serde_json::Value`, read from the binary
    /// layout (see `find_key`) instead of printed as text and parsed again
    /// (the text round trip was a sixth of loading an environment, and
    /// jsonb_util.c's iterator, called through the guard once per token,
    /// cost nearly as much). It answers what `parse_document(&self.to_text())`
    /// answers, refusals included, which a differential test holds it to:
    /// numbers are read from numeric_out's text as serde_json reads them,
    /// and a document nested deeper than serde_json reads is refused alike.
    pub fn to_document(&self) -> Result<Value, String> {
        // SAFETY: the root is a complete container built by PostgreSQL that
        // lives for 'fcx (see `root`).
        unsafe { read_container(self.root(), 0) }
    }

    /// Writes the value of one top-level key of an object into `slot`,
    /// reusing the slot's string buffer; false when the key is absent or the
    /// argument is not an object.
    pub fn read_into(&self, key: &str, slot: &mut Value) -> bool {
        if !self.is_object() {
            return false;
        }
        // SAFETY: the root is a valid object container that lives for the
        // call; strings found in it are copied into the slot.
        unsafe {
            match find_key(self.root(), key.as_bytes()) {
                Entry::Absent => false,
                Entry::String(bytes) => {
                    copy_string_into(bytes, slot);
                    true
                }
                Entry::Scalar(value) => {
                    *slot = value;
                    true
                }
                Entry::Number(numeric) => match numeric::whole_number(numeric) {
                    Some(whole) => {
                        *slot = Value::Number(whole);
                        true
                    }
                    None => self.read_other_into(key, slot),
                },
                Entry::Other => self.read_other_into(key, slot),
            }
        }
    }

    /// Numbers and nested containers, through jsonb_util.c's own lookup.
    ///
    /// # Safety
    /// `self` must be an object (`is_object`).
    unsafe fn read_other_into(&self, key: &str, slot: &mut Value) -> bool {
        let mut found = MaybeUninit::<pg_sys::JsonbValue>::uninit();
        // SAFETY: the key is passed with its length, so it need not be
        // NUL-terminated; the result is either NULL or `found`.
        let result = crate::postgres::unguarded::getKeyJsonValueFromContainer(
            self.root(),
            key.as_ptr().cast::<c_char>(),
            key.len() as c_int,
            found.as_mut_ptr(),
        );
        match result.as_ref() {
            Some(value) => {
                *slot = to_value(value);
                true
            }
            None => false,
        }
    }
}

/// What a top-level key of an object container holds.
enum Entry<'a> {
    Absent,
    String(&'a [u8]),
    Scalar(Value),
    /// A stored `numeric` (its varlena): whole numbers are read in place,
    /// others left to PostgreSQL to decode.
    Number(*const u8),
    /// A nested container, left to PostgreSQL to decode.
    Other,
}

/// Binary search of an object container's keys, reading the on-disk layout
/// of jsonb.h directly, so that a string value goes straight into its slot
/// without an intermediate `JsonbValue` (whole numbers are read in place too;
/// other numbers and nested containers go through PostgreSQL's decoding).
///
/// Layout: a header word (pair count), then one JEntry per key followed by
/// one per value, then the data. A JEntry holds either the length of its
/// item or, on every 32nd entry (`JENTRY_HAS_OFF`), the end offset, so an
/// item's start is the sum of the lengths back to the last stored offset.
/// Keys are sorted by length, then bytes.
///
/// # Safety
/// `container` must be a complete object container built by PostgreSQL's
/// jsonb code (so every offset and length stays inside it), valid for `'a`.
/// The differential test in this module checks the layout reading against
/// serde_json on generated documents.
unsafe fn find_key<'a>(container: *const pg_sys::JsonbContainer, key: &[u8]) -> Entry<'a> {
    let pairs = ((*container).header & pg_sys::JB_CMASK) as usize;
    let entries = std::ptr::addr_of!((*container).children).cast::<u32>();
    let data = entries.add(pairs * 2).cast::<u8>();
    let entry = |index: usize| *entries.add(index);
    let start = |index: usize| {
        let mut offset = 0u32;
        for earlier in (0..index).rev() {
            offset += entry(earlier) & pg_sys::JENTRY_OFFLENMASK;
            if entry(earlier) & pg_sys::JENTRY_HAS_OFF != 0 {
                break;
            }
        }
        offset as usize
    };
    let bounds = |index: usize| {
        let begin = start(index);
        let field = (entry(index) & pg_sys::JENTRY_OFFLENMASK) as usize;
        let length = if entry(index) & pg_sys::JENTRY_HAS_OFF != 0 {
            field - begin
        } else {
            field
        };
        (begin, length)
    };

    let (mut low, mut high) = (0, pairs);
    while low < high {
        let middle = (low + high) / 2;
        let (begin, length) = bounds(middle);
        let candidate = std::slice::from_raw_parts(data.add(begin), length);
        match length.cmp(&key.len()).then_with(|| candidate.cmp(key)) {
            std::cmp::Ordering::Less => low = middle + 1,
            std::cmp::Ordering::Greater => high = middle,
            std::cmp::Ordering::Equal => {
                let index = pairs + middle;
                return match entry(index) & pg_sys::JENTRY_TYPEMASK {
                    pg_sys::JENTRY_ISSTRING => {
                        let (begin, length) = bounds(index);
                        Entry::String(std::slice::from_raw_parts(data.add(begin), length))
                    }
                    pg_sys::JENTRY_ISBOOL_TRUE => Entry::Scalar(Value::Bool(true)),
                    pg_sys::JENTRY_ISBOOL_FALSE => Entry::Scalar(Value::Bool(false)),
                    pg_sys::JENTRY_ISNULL => Entry::Scalar(Value::Null),
                    pg_sys::JENTRY_ISNUMERIC => {
                        // Numbers sit at int-aligned offsets of the data.
                        let (begin, _) = bounds(index);
                        Entry::Number(data.add((begin + 3) & !3))
                    }
                    _ => Entry::Other,
                };
            }
        }
    }
    Entry::Absent
}

/// Copies jsonb string bytes into `slot`, overwriting the slot's previous
/// string in place, so a warm slot converts without allocating.
fn copy_string_into(bytes: &[u8], slot: &mut Value) {
    let text = if super::backend::database_is_utf8() {
        // SAFETY: PostgreSQL validated the text against the UTF-8 database
        // encoding when the jsonb was built.
        std::borrow::Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        String::from_utf8_lossy(bytes)
    };
    match slot {
        Value::String(previous) => {
            previous.clear();
            previous.push_str(&text);
        }
        other => *other = Value::String(text.into_owned()),
    }
}

fn too_deep() -> String {
    format!("nests deeper than {MAX_READABLE_DEPTH} levels of JSON")
}

/// A container and everything in it, read from jsonb.h's layout: a header
/// word (item count and kind), one JEntry per item (an object's keys first,
/// then its values, both in key order), then the items' data. Each JEntry
/// holds its item's length or, every 32nd, its end offset, so reading the
/// items in order keeps a running offset. Numbers and nested containers sit
/// at int-aligned offsets. A top-level scalar is a one-item array flagged
/// `JB_FSCALAR`, which is no level of nesting. `enclosing` counts the
/// containers around this one.
///
/// # Safety
/// `container` must be a complete container built by PostgreSQL's jsonb
/// code (so every offset and length stays inside it), valid while the
/// result is built.
unsafe fn read_container(
    container: *const pg_sys::JsonbContainer,
    enclosing: usize,
) -> Result<Value, String> {
    let header = (*container).header;
    let count = (header & pg_sys::JB_CMASK) as usize;
    let is_object = header & pg_sys::JB_FOBJECT != 0;
    let is_scalar = header & pg_sys::JB_FSCALAR != 0;
    // serde_json reads 127 nested containers and refuses the 128th.
    let depth = if is_scalar { enclosing } else { enclosing + 1 };
    if depth >= MAX_READABLE_DEPTH {
        return Err(too_deep());
    }
    let entry_count = if is_object { count * 2 } else { count };
    let entries = std::ptr::addr_of!((*container).children).cast::<u32>();
    let data = entries.add(entry_count).cast::<u8>();
    // Each item's JEntry and its bounds in the data, in one pass.
    let mut end = 0usize;
    let bounds: Vec<(u32, usize, usize)> = (0..entry_count)
        .map(|index| {
            let entry = *entries.add(index);
            let begin = end;
            let field = (entry & pg_sys::JENTRY_OFFLENMASK) as usize;
            end = if entry & pg_sys::JENTRY_HAS_OFF != 0 {
                field
            } else {
                begin + field
            };
            (entry, begin, end)
        })
        .collect();
    let bytes = |begin: usize, end: usize| std::slice::from_raw_parts(data.add(begin), end - begin);
    let item = |(entry, begin, end): (u32, usize, usize)| -> Result<Value, String> {
        let aligned = data.add((begin + 3) & !3);
        Ok(match entry & pg_sys::JENTRY_TYPEMASK {
            pg_sys::JENTRY_ISSTRING => Value::String(utf8(bytes(begin, end))?),
            pg_sys::JENTRY_ISNUMERIC => number(aligned.cast_mut().cast())?,
            pg_sys::JENTRY_ISBOOL_TRUE => Value::Bool(true),
            pg_sys::JENTRY_ISBOOL_FALSE => Value::Bool(false),
            pg_sys::JENTRY_ISCONTAINER => read_container(aligned.cast(), depth)?,
            _ => Value::Null,
        })
    };
    if is_object {
        let mut members = serde_json::Map::new();
        for (&(_, begin, end), &value) in bounds[..count].iter().zip(&bounds[count..]) {
            members.insert(utf8(bytes(begin, end))?, item(value)?);
        }
        Ok(Value::Object(members))
    } else if is_scalar {
        bounds.first().map_or(Ok(Value::Null), |&only| item(only))
    } else {
        bounds
            .into_iter()
            .map(item)
            .collect::<Result<_, _>>()
            .map(Value::Array)
    }
}

/// A string of the document. In a database of another encoding the text
/// path read it lossily too (pgrx's text conversion), so this does.
fn utf8(bytes: &[u8]) -> Result<String, String> {
    if super::backend::database_is_utf8() {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| "cannot be read (a string is not UTF-8)".to_string())
    } else {
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// A stored number as serde_json reads jsonb's text of it: numeric_out is
/// what jsonb_out prints, so integers, doubles and refusals stay as they
/// were on the text path.
///
/// # Safety
/// `numeric` must point to a complete numeric inside a live container.
unsafe fn number(numeric: pg_sys::Numeric) -> Result<Value, String> {
    if let Some(whole) = numeric::whole_number(numeric.cast()) {
        return Ok(Value::Number(whole));
    }
    let text = pgrx::direct_function_call::<&CStr>(
        pg_sys::numeric_out,
        &[Some(pg_sys::Datum::from(numeric))],
    )
    .map(CStr::to_string_lossy)
    .unwrap_or_default();
    parse_document(&text)
}

/// Converts one looked-up non-string value.
///
/// # Safety
/// `value` must be what jsonb_util.c filled in from a live container: its
/// numeric or binary pointers point into that container.
unsafe fn to_value(value: &pg_sys::JsonbValue) -> Value {
    match value.type_ {
        jbvType::jbvBool => Value::Bool(value.val.boolean),
        jbvType::jbvNumeric => {
            if let Some(whole) = numeric::whole_number(value.val.numeric.cast()) {
                return Value::Number(whole);
            }
            let text = pg_sys::numeric_normalize(value.val.numeric);
            let text = CStr::from_ptr(text).to_string_lossy();
            text.parse::<Number>()
                .ok()
                .or_else(|| text.parse::<f64>().ok().and_then(Number::from_f64))
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }
        // A nested container, read from its layout as documents are.
        jbvType::jbvBinary => read_container(value.val.binary.data, 0).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

impl FromDatum for JsonbArg<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY (the caller's, as FromDatum requires): a non-null datum of
        // type jsonb, valid for the call. Below, the checks read only its
        // header; pg_detoast_datum is guarded and returns a palloc'd copy in
        // the call's memory context, so either pointer lives for 'fcx.
        // The container needs a plain 4-byte header; a value that already has
        // one (anything built in memory) is used in place, without the
        // guarded call, and only short, compressed or external values are
        // detoasted into a copy.
        let varlena = datum.cast_mut_ptr::<pg_sys::varlena>();
        let jsonb = if pgrx::varlena::varatt_is_4b_u(varlena) {
            varlena
        } else {
            pg_sys::pg_detoast_datum(varlena)
        }
        .cast::<pg_sys::Jsonb>();
        Some(JsonbArg {
            jsonb: std::ptr::NonNull::new(jsonb)?,
            call: std::marker::PhantomData,
        })
    }
}

crate::postgres::args::arg_from_datum!(JsonbArg<'fcx>);

impl_sql_translatable!(JsonbArg<'_>, arg_only = "jsonb");

/// A `jsonb` result built in place.
pub struct BuiltJsonb(pg_sys::Datum);

impl BuiltJsonb {
    /// The complete varlena, header included, to keep beyond this call.
    pub fn to_bytes(&self) -> Box<[u8]> {
        let varlena = self.0.cast_mut_ptr::<pg_sys::varlena>();
        // SAFETY: the datum is a jsonb that JsonbValueToJsonb or from_bytes
        // made in this call, with a plain 4-byte header giving its size.
        unsafe {
            let size = pgrx::varlena::varsize_4b(varlena);
            std::slice::from_raw_parts(varlena.cast::<u8>(), size).into()
        }
    }

    /// A document built in the current memory context.
    pub fn from_value(value: &Value) -> BuiltJsonb {
        match value {
            Value::Object(map)
                if map
                    .values()
                    .all(|item| !item.is_object() && !item.is_array()) =>
            {
                flat_object(map)
            }
            _ => Builder::build(value),
        }
    }

    /// A fresh copy, in the current memory context, of bytes `to_bytes` kept.
    pub fn from_bytes(bytes: &[u8]) -> BuiltJsonb {
        // SAFETY: palloc (guarded) returns at least `len` writable bytes in
        // the current memory context, or raises before anything is copied;
        // the source is a whole varlena that `to_bytes` kept.
        unsafe {
            let copy = pg_sys::palloc(bytes.len()).cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
            BuiltJsonb(pg_sys::Datum::from(copy))
        }
    }
}

// SAFETY: the datum is a complete jsonb varlena palloc'd in the current
// memory context during this call, which is what a function returning
// jsonb hands back to the executor.
unsafe impl BoxRet for BuiltJsonb {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        fcinfo.return_raw_datum(self.0)
    }
}

impl_sql_translatable!(BuiltJsonb, "jsonb");

/// Accumulates tokens with `pushJsonbValue`. PostgreSQL keeps pointers to
/// the strings pushed (keys and string values) until `finish` copies them
/// into the result, so the builder borrows everything it is given for `'a`:
/// handing it a temporary is a compile error, not freed memory in a result.
pub struct Builder<'a> {
    state: *mut pg_sys::JsonbParseState,
    result: *mut pg_sys::JsonbValue,
    borrowed: std::marker::PhantomData<&'a str>,
}

impl<'a> Builder<'a> {
    pub fn new() -> Builder<'a> {
        Builder {
            state: std::ptr::null_mut(),
            result: std::ptr::null_mut(),
            borrowed: std::marker::PhantomData,
        }
    }

    /// `value`'s string data, if any, must live for `'a`: every public
    /// method that reaches here takes its text as `&'a`.
    fn push(&mut self, token: Token::Type, value: Option<pg_sys::JsonbValue>) {
        let mut value = value;
        let pointer = value
            .as_mut()
            .map_or(std::ptr::null_mut(), |value| value as *mut _);
        // SAFETY: `state` is null or the parse state earlier pushes returned,
        // allocated in the current memory context, which outlives the builder
        // (it lives for one function call). pushJsonbValue copies the struct
        // behind `pointer` (valid for this call) but keeps its string pointer,
        // which borrows data of lifetime 'a, so it stays valid until `finish`.
        // The call is guarded: an ERROR (too many pairs, out of memory)
        // unwinds as a Rust panic and the builder owns nothing to free.
        self.result = unsafe { pg_sys::pushJsonbValue(&mut self.state, token, pointer) };
    }

    pub fn begin_object(&mut self) {
        self.push(Token::WJB_BEGIN_OBJECT, None);
    }

    pub fn end_object(&mut self) {
        self.push(Token::WJB_END_OBJECT, None);
    }

    pub fn key(&mut self, key: &'a str) {
        self.push(Token::WJB_KEY, Some(string(key)));
    }

    pub fn string_value(&mut self, text: &'a str) {
        self.push(Token::WJB_VALUE, Some(string(text)));
    }

    pub fn value(&mut self, value: &'a Value) {
        self.any(value, Token::WJB_VALUE);
    }

    /// Pushes `value` without recursion, so no document can exhaust the
    /// stack here: an explicit stack of the containers still open.
    fn any(&mut self, value: &'a Value, token: Token::Type) {
        enum Step<'v> {
            Open(&'v Value, Token::Type),
            Key(&'v str),
            Close(Token::Type),
        }
        let mut pending = vec![Step::Open(value, token)];
        while let Some(step) = pending.pop() {
            match step {
                Step::Key(key) => self.key(key),
                Step::Close(token) => self.push(token, None),
                Step::Open(Value::Object(map), _) => {
                    self.begin_object();
                    pending.push(Step::Close(Token::WJB_END_OBJECT));
                    for (key, item) in map.iter().rev() {
                        pending.push(Step::Open(item, Token::WJB_VALUE));
                        pending.push(Step::Key(key));
                    }
                }
                Step::Open(Value::Array(items), _) => {
                    self.push(Token::WJB_BEGIN_ARRAY, None);
                    pending.push(Step::Close(Token::WJB_END_ARRAY));
                    for item in items.iter().rev() {
                        pending.push(Step::Open(item, Token::WJB_ELEM));
                    }
                }
                Step::Open(scalar, token) => self.push(token, Some(scalar_value(scalar))),
            }
        }
    }

    /// Any document, token by token. A scalar at the top is stored by
    /// jsonb as a one-element "raw scalar" array.
    fn build(value: &Value) -> BuiltJsonb {
        let mut builder = Builder::new();
        if value.is_object() || value.is_array() {
            builder.value(value);
        } else {
            let raw_scalar = pg_sys::JsonbValue {
                type_: jbvType::jbvArray,
                val: pg_sys::JsonbValue__bindgen_ty_1 {
                    array: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_2 {
                        nElems: 1,
                        elems: std::ptr::null_mut(),
                        rawScalar: true,
                    },
                },
            };
            builder.push(Token::WJB_BEGIN_ARRAY, Some(raw_scalar));
            builder.any(value, Token::WJB_ELEM);
            builder.push(Token::WJB_END_ARRAY, None);
        }
        builder.finish()
    }

    pub fn finish(self) -> BuiltJsonb {
        assert!(!self.result.is_null(), "an empty jsonb builder");
        // SAFETY: `result` is the completed top-level value pushJsonbValue
        // returned on the last END token; every string it points to is
        // borrowed for 'a, which outlives `self`. JsonbValueToJsonb copies
        // them all into one new palloc'd varlena.
        let jsonb = unsafe { pg_sys::JsonbValueToJsonb(self.result) };
        BuiltJsonb(pg_sys::Datum::from(jsonb))
    }
}

/// An object of scalars (usage answers, evaluation results) in one call:
/// its pairs are laid out in jsonb's key order, shorter keys first and then
/// bytewise, so `JsonbValueToJsonb` writes them as they are, where the
/// token-by-token builder pays a guarded call per token and a sort.
fn flat_object(map: &serde_json::Map<String, Value>) -> BuiltJsonb {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    let mut pairs: Vec<pg_sys::JsonbPair> = entries
        .into_iter()
        .enumerate()
        .map(|(order, (key, value))| pg_sys::JsonbPair {
            key: string(key),
            value: scalar_value(value),
            order: order as u32,
        })
        .collect();
    let mut object = pg_sys::JsonbValue {
        type_: jbvType::jbvObject,
        val: pg_sys::JsonbValue__bindgen_ty_1 {
            object: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_3 {
                nPairs: pairs.len() as c_int,
                pairs: pairs.as_mut_ptr(),
            },
        },
    };
    // SAFETY: `pairs` (and the strings of `map` they point to) outlive the
    // call, which copies everything into a new palloc'd Jsonb; the pairs are
    // in jsonb's key order and unique (a map's keys), as JsonbValueToJsonb
    // expects of an object it does not sort. Guarded: an ERROR unwinds with
    // only Rust-owned memory to drop.
    let jsonb = unsafe { pg_sys::JsonbValueToJsonb(&mut object) };
    BuiltJsonb(pg_sys::Datum::from(jsonb))
}

fn string(text: &str) -> pg_sys::JsonbValue {
    pg_sys::JsonbValue {
        type_: jbvType::jbvString,
        val: pg_sys::JsonbValue__bindgen_ty_1 {
            string: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
                len: text.len() as c_int,
                val: text.as_ptr().cast_mut().cast::<c_char>(),
            },
        },
    }
}

fn scalar_value(value: &Value) -> pg_sys::JsonbValue {
    match value {
        Value::String(text) => string(text),
        Value::Bool(flag) => pg_sys::JsonbValue {
            type_: jbvType::jbvBool,
            val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: *flag },
        },
        Value::Number(number) => pg_sys::JsonbValue {
            type_: jbvType::jbvNumeric,
            val: pg_sys::JsonbValue__bindgen_ty_1 {
                numeric: numeric(number).cast_mut_ptr(),
            },
        },
        _ => pg_sys::JsonbValue {
            type_: jbvType::jbvNull,
            val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: false },
        },
    }
}

/// A new palloc'd Numeric. Counts and limits go from int8 directly, with no
/// text formatting and parsing in between; other numbers through their text.
fn numeric(number: &Number) -> pg_sys::Datum {
    // SAFETY: int8_numeric converts any int8, numeric_in any valid numeric
    // literal (which serde_json's numbers print as), into a new Numeric.
    unsafe {
        match number.as_i64() {
            Some(integer) => direct_function_call_as_datum(
                pg_sys::int8_numeric,
                &[Some(pg_sys::Datum::from(integer))],
            ),
            None => {
                let text = CString::new(number.to_string()).expect("numbers have no NUL");
                direct_function_call_as_datum(
                    pg_sys::numeric_in,
                    &[
                        Some(pg_sys::Datum::from(text.as_ptr())),
                        Some(pg_sys::Datum::from(pg_sys::InvalidOid)),
                        Some(pg_sys::Datum::from(-1i32)),
                    ],
                )
            }
        }
    }
    .expect("numeric conversions return a value")
}

/// A `jsonb` argument read as a whole document (`serde_json::Value`), with
/// the reasons it may not be readable answered as 22023 naming the
/// argument, where pgrx's `JsonB` would panic (XX000): nesting beyond
/// serde_json's 128 levels, or a number beyond the range of a double.
pub struct DocumentArg<'fcx>(JsonbArg<'fcx>);

/// How deep serde_json reads (its fixed recursion limit).
pub const MAX_READABLE_DEPTH: usize = 128;

impl DocumentArg<'_> {
    /// The document, or 22023 naming `subject` (e.g. `flag "checkout"`).
    pub fn value(&self, subject: &str) -> Value {
        self.0.to_document().unwrap_or_else(|why| {
            crate::errors::invalid_parameter(format!("{subject}: {why}"), None)
        })
    }
}

/// Reads JSON text as jsonb printed it; says why not, in words for a user.
pub fn parse_document(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|error| {
        if error.to_string().contains("recursion limit") {
            too_deep()
        } else {
            format!("cannot be read ({error}); numbers must fit a double")
        }
    })
}

impl FromDatum for DocumentArg<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        oid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: the caller's promise for `datum` is passed on unchanged.
        unsafe { JsonbArg::from_polymorphic_datum(datum, is_null, oid) }.map(DocumentArg)
    }
}

crate::postgres::args::arg_from_datum!(DocumentArg<'fcx>);

impl_sql_translatable!(DocumentArg<'_>, arg_only = "jsonb");

/// The fast paths above against serde_json on generated documents.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // In a file of its own to keep this one short; #[pg_schema] needs the
    // module inline.
    include!("jsonb/tests.rs");
}
