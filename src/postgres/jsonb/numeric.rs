//! Whole numbers read straight from a stored `numeric`, without
//! numeric_out's text: a context's `"seats": 12` and a configuration's
//! rollout weights are integers, and printing them to parse them again (a
//! guarded call, a palloc'd string and a parse) cost more than the rest of
//! reading the attribute. Anything else (a fraction, a display scale, NaN
//! or infinity, more than 64 bits) is left to the text path, so the answer
//! is always the one the text path gives; the jsonb differential tests
//! (`the_binary_reader_agrees_with_serde_json`,
//! `the_document_reader_agrees_with_the_text_path`) hold it to that.
//!
//! Layout (PostgreSQL's numeric.c, stable since 9.1): a 4-byte varlena
//! header, then either the short form — one `u16` header: 0x8000 set,
//! sign 0x2000, display scale in 0x1F80, a 7-bit signed weight in 0x007F —
//! or the long form — `u16` sign (0x0000 or 0x4000) and display scale
//! (0x3FFF), then an `i16` weight — followed by the base-10 000 digits,
//! most significant first, as `i16`. The value is the sum of
//! `digit[i] * 10000^(weight - i)`; trailing zero digits are not stored.
//! 0xC000 marks NaN and the infinities.

use serde_json::Number;

const SIGN_MASK: u16 = 0xC000;
const NEGATIVE: u16 = 0x4000;
const SHORT: u16 = 0x8000;
const SPECIAL: u16 = 0xC000;
const SHORT_NEGATIVE: u16 = 0x2000;
const SHORT_SCALE_MASK: u16 = 0x1F80;
const SHORT_WEIGHT_SIGN: u16 = 0x0040;
const SHORT_WEIGHT_MASK: u16 = 0x003F;
const LONG_SCALE_MASK: u16 = 0x3FFF;
const BASE: i128 = 10_000;

/// The stored number as serde_json reads its text, when it is a whole
/// number with no display scale that fits `u64` or `i64`; `None` sends the
/// caller to the text path.
///
/// # Safety
/// `numeric` must point to a complete `numeric` varlena (as stored inside a
/// jsonb container, at an int-aligned offset), valid for the call.
pub(super) unsafe fn whole_number(numeric: *const u8) -> Option<Number> {
    let varlena = numeric.cast::<pgrx::pg_sys::varlena>().cast_mut();
    if !pgrx::varlena::varatt_is_4b_u(varlena) {
        return None;
    }
    let size = pgrx::varlena::varsize_4b(varlena);
    let header = numeric.add(4).cast::<u16>().read_unaligned();
    let (negative, scale, weight, digits_at) = match header & SIGN_MASK {
        SPECIAL => return None,
        SHORT => {
            let magnitude = i32::from(header & SHORT_WEIGHT_MASK);
            let weight = if header & SHORT_WEIGHT_SIGN != 0 {
                magnitude - 64
            } else {
                magnitude
            };
            let scale = (header & SHORT_SCALE_MASK) >> 7;
            (header & SHORT_NEGATIVE != 0, scale, weight, 6)
        }
        sign => {
            let weight = i32::from(numeric.add(6).cast::<i16>().read_unaligned());
            (sign == NEGATIVE, header & LONG_SCALE_MASK, weight, 8)
        }
    };
    if scale != 0 || size < digits_at {
        return None;
    }
    let count = (size - digits_at) / 2;
    // Five base-10 000 digits reach 10^20 > u64::MAX: more is never whole
    // and in range, and bounding it keeps the sum inside i128.
    if count as i32 > weight + 1 || weight > 4 {
        return None;
    }
    let mut value: i128 = 0;
    for index in 0..count {
        let digit = numeric
            .add(digits_at + 2 * index)
            .cast::<i16>()
            .read_unaligned();
        value = value * BASE + i128::from(digit);
    }
    for _ in count as i32..weight + 1 {
        value *= BASE;
    }
    if negative {
        // numeric.c never stores a negative zero, but jsonb's text of one
        // would read as -0.0: leave it to the text path.
        if value == 0 {
            return None;
        }
        value = -value;
    }
    if let Ok(positive) = u64::try_from(value) {
        Some(Number::from(positive))
    } else {
        i64::try_from(value).ok().map(Number::from)
    }
}
