//! HPACK decoding (RFC 7541) for Fulcrum's own HTTP/2 client and server, and the typed
//! header fields made from it.
//!
//! Why our own: the decoders on crates.io that are not part of an HTTP/2 stack (`hpack` and its
//! forks `loona-hpack` / `fluke-hpack`) build their Huffman table as nested hash maps on every
//! Huffman-coded string and decode bit by bit through them: on the router's request path that
//! was a fifth of its CPU (perf), because gRPC clients send `grpc-timeout`, a new value every
//! call, Huffman-coded. `h2` has a fast decoder, but not public. This one decodes Huffman codes of
//! up to 8 bits (every letter and digit) with one table look-up, and longer ones by the canonical
//! code's first-code-per-length rule; the code itself (RFC 7541 Appendix B) is
//! `httlib-huffman`'s table. Encoding needs no module: both ends encode without the dynamic
//! table (`wire.rs`).
//!
//! Two memories per connection spare work a peer makes the same way on every call: the last
//! few Huffman-coded strings decoded (`h2` never indexes `:path`, so tonic's clients send it as
//! a Huffman literal each time), and [`TypedFields`], the fields already made into
//! `HeaderName`/`HeaderValue`.
//!
//! Bounded against hostile peers: the dynamic table never grows beyond the size this side
//! allowed (SETTINGS_HEADER_TABLE_SIZE), integers beyond 2^28 and strings beyond the block are
//! errors, and a size update is accepted only at the start of a block.

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::Bytes;

/// The static table (RFC 7541 Appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The static table's index of a name, for the names Fulcrum's requests and answers carry that
/// it has (zero: not there, sent as a literal name).
pub(crate) fn static_name(name: &str) -> usize {
    match name {
        "content-type" => 31,
        "user-agent" => 58,
        "accept-encoding" => 16,
        "authorization" => 23,
        "date" => 33,
        "server" => 54,
        _ => 0,
    }
}

/// Why a header block could not be decoded (a COMPRESSION_ERROR for the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// An index outside the static and dynamic tables.
    #[error("an index outside the tables")]
    BadIndex,
    /// An integer or string running past the block, or an integer beyond 2^28.
    #[error("a truncated or oversized integer or string")]
    Truncated,
    /// A Huffman string that does not decode (EOS inside, or bad padding).
    #[error("a Huffman string that does not decode")]
    Huffman,
    /// A dynamic table size update above the allowed size, or not at the block's start.
    #[error("a table size update not allowed")]
    SizeUpdate,
}

/// An HPACK decoder: the dynamic table of one direction of one connection.
#[derive(Debug)]
pub(crate) struct Decoder {
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max: usize,
    allowed: usize,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
    huffman: HuffmanMemo,
}

/// How many Huffman-coded strings a decoder remembers the decoding of. A client sends the same
/// few long strings on every call of a connection — `h2` (tonic's clients) never indexes
/// `:path`, so `/inference.GRPCInferenceService/ModelInfer` came as a 31-byte Huffman literal
/// each time, decoding it was 3 % of the router's instructions a call — and a handful of
/// slots holds them; more would only lengthen the look-up for strings that do not repeat.
const HUFFMAN_MEMO: usize = 4;

/// Huffman strings shorter than this (encoded) are decoded again each time: a look-up and copy
/// would cost about what decoding a few symbols does.
const HUFFMAN_MEMO_MIN: usize = 12;

/// The last few Huffman-coded strings decoded, by their encoded bytes. A miss replaces the
/// oldest slot, reusing its buffers: strings that do not repeat (a deadline that changes every
/// call) cost a comparison and a copy, no allocation.
#[derive(Debug, Default)]
struct HuffmanMemo {
    /// (encoded, decoded) pairs.
    slots: Vec<(Vec<u8>, Vec<u8>)>,
    /// The slot a miss replaces next.
    next: usize,
}

impl HuffmanMemo {
    /// Decodes `raw` onto `out` (cleared first), from memory when it was decoded lately.
    fn decode(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        out.clear();
        if raw.len() < HUFFMAN_MEMO_MIN {
            return huffman_decode(raw, out);
        }
        if let Some((_, decoded)) = self.slots.iter().find(|(r, _)| r.as_slice() == raw) {
            out.extend_from_slice(decoded);
            return Ok(());
        }
        huffman_decode(raw, out)?;
        if self.slots.len() < HUFFMAN_MEMO {
            self.slots.push((raw.to_vec(), out.clone()));
        } else {
            let (r, d) = &mut self.slots[self.next];
            r.clear();
            r.extend_from_slice(raw);
            d.clear();
            d.extend_from_slice(out);
            self.next = (self.next + 1) % HUFFMAN_MEMO;
        }
        Ok(())
    }
}

/// Per RFC 7541 §4.1: an entry's size counts 32 bytes of overhead.
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

impl Decoder {
    /// A decoder whose peer may use a dynamic table of at most `allowed` bytes.
    pub(crate) fn new(allowed: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max: allowed,
            allowed,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
            huffman: HuffmanMemo::default(),
        }
    }

    /// Decodes a complete header block, handing each field to `f` as it is decoded.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let mut at = 0;
        let mut first = true;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                let (index, n) = integer(&block[at..], 7)?;
                at += n;
                let (name, value) = self.entry(index)?;
                f(name, value);
            } else if b & 0xe0 == 0x20 {
                let (size, n) = integer(&block[at..], 5)?;
                at += n;
                if !first || size > self.allowed {
                    return Err(DecodeError::SizeUpdate);
                }
                self.max = size;
                self.evict(0);
                continue;
            } else {
                let (indexing, prefix) = if b & 0xc0 == 0x40 {
                    (true, 6)
                } else {
                    (false, 4)
                };
                let (index, n) = integer(&block[at..], prefix)?;
                at += n;
                let mut name_buf = std::mem::take(&mut self.name_buf);
                let mut value_buf = std::mem::take(&mut self.value_buf);
                let mut huffman = std::mem::take(&mut self.huffman);
                let result = (|| {
                    let name: &[u8] = if index == 0 {
                        let (s, n) = string(&block[at..], &mut name_buf, &mut huffman)?;
                        at += n;
                        match s {
                            Some(s) => s,
                            None => &name_buf,
                        }
                    } else {
                        self.entry(index)?.0
                    };
                    let (v, n) = string(&block[at..], &mut value_buf, &mut huffman)?;
                    at += n;
                    let value: &[u8] = match v {
                        Some(v) => v,
                        None => &value_buf,
                    };
                    f(name, value);
                    Ok::<_, DecodeError>(
                        indexing
                            .then(|| (Bytes::copy_from_slice(name), Bytes::copy_from_slice(value))),
                    )
                })();
                self.name_buf = name_buf;
                self.value_buf = value_buf;
                self.huffman = huffman;
                if let Some((name, value)) = result? {
                    self.insert(name, value);
                }
            }
            first = false;
        }
        Ok(())
    }

    /// The field at `index` of the static table (1-61) or the dynamic one (62 on).
    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            0 => Err(DecodeError::BadIndex),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(DecodeError::BadIndex),
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = entry_size(&name, &value);
        if size > self.max {
            // Larger than the table: the table is emptied and nothing added (§4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= entry_size(&n, &v);
        }
    }
}

/// How many decoded fields a connection keeps in typed form. A gRPC client repeats the same
/// few fields on every call (`content-type`, `te`, `user-agent`, `grpc-accept-encoding`, a
/// fixed `grpc-timeout`, its metadata), a node likewise in its answers (`content-type`,
/// `grpc-status: 0`, its own tags): 16 holds them with room to spare.
const TYPED_FIELDS: usize = 16;

/// Fields longer than this (name and value) are not kept: long values (tokens, trace
/// contexts) rarely repeat, and comparing them would cost what parsing them does.
const TYPED_FIELD_MAX: usize = 256;

/// Decoded header fields of one connection in typed form (`HeaderName`, `HeaderValue`), by
/// their bytes. Making them from bytes (checking every byte, the name against the standard
/// names, copying the value, allocating a custom name) was ~500 instructions a field and most
/// of the ~16 % of the router's instructions a call that went to header blocks (callgrind); a
/// repeated field is a comparison and two reference-count increments.
///
/// Kept by the CLOCK rule: a miss takes the first slot not used since the hand last passed
/// it, so a field that changes every call (a client's remaining deadline) keeps replacing
/// its own unused slot and the fields every call repeats stay.
#[derive(Debug, Default)]
pub(crate) struct TypedFields {
    slots: Vec<TypedField>,
    /// The CLOCK hand: the next slot a miss may take.
    hand: usize,
    /// The slot after the last one found.
    after: usize,
}

#[derive(Debug)]
struct TypedField {
    /// The name's bytes, then the value's.
    raw: Vec<u8>,
    name_len: usize,
    name: http::HeaderName,
    value: http::HeaderValue,
    used: bool,
}

impl TypedFields {
    /// `name` and `value` in typed form, or `None` if either is not valid.
    pub(crate) fn get(
        &mut self,
        name: &[u8],
        value: &[u8],
    ) -> Option<(http::HeaderName, http::HeaderValue)> {
        // A peer sends its fields in the same order every time, and they were kept in that
        // order: the look-up starts after the last field found, where the next one usually is.
        let n = self.slots.len();
        let mut same_name = None;
        for i in (self.after.min(n)..n).chain(0..self.after.min(n)) {
            let f = &mut self.slots[i];
            if f.name_len == name.len() && f.raw[..f.name_len] == *name {
                if f.raw[f.name_len..] == *value {
                    f.used = true;
                    self.after = i + 1;
                    return Some((f.name.clone(), f.value.clone()));
                }
                same_name = Some(i);
            }
        }
        let typed = (
            http::HeaderName::from_bytes(name).ok()?,
            http::HeaderValue::from_bytes(value).ok()?,
        );
        if name.len() + value.len() <= TYPED_FIELD_MAX {
            self.keep(same_name, name, value, &typed);
        }
        Some(typed)
    }

    /// Keeps a field that missed: in the slot of its name when one holds another value of it
    /// (a field whose value changes — a deadline, a date — holds one slot, not all of them),
    /// else in a new slot while there is room, else in the slot the CLOCK hand gives.
    fn keep(
        &mut self,
        same_name: Option<usize>,
        name: &[u8],
        value: &[u8],
        typed: &(http::HeaderName, http::HeaderValue),
    ) {
        let slot = match same_name {
            Some(i) => &mut self.slots[i],
            None if self.slots.len() < TYPED_FIELDS => {
                return self.slots.push(TypedField {
                    raw: [name, value].concat(),
                    name_len: name.len(),
                    name: typed.0.clone(),
                    value: typed.1.clone(),
                    used: false,
                });
            }
            None => loop {
                // At most one full turn clears every bit, so a slot is found within two.
                let i = self.hand;
                self.hand = (self.hand + 1) % TYPED_FIELDS;
                if !std::mem::take(&mut self.slots[i].used) {
                    break &mut self.slots[i];
                }
            },
        };
        slot.raw.clear();
        slot.raw.extend_from_slice(name);
        slot.raw.extend_from_slice(value);
        slot.name_len = name.len();
        slot.name = typed.0.clone();
        slot.value = typed.1.clone();
        slot.used = false;
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1): its value and the bytes it took.
fn integer(buf: &[u8], n: u32) -> Result<(usize, usize), DecodeError> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*buf.first().ok_or(DecodeError::Truncated)?) & max;
    if value < max {
        return Ok((value, 1));
    }
    let mut shift = 0;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        if shift > 21 {
            // Beyond 2^28: no header needs it; a peer sending it is attacking.
            return Err(DecodeError::Truncated);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(DecodeError::Truncated)
}

/// A string literal (§5.2): the raw bytes when not Huffman-coded (`Some`), else decoded into
/// `out` (`None`); and the bytes it took.
fn string<'a>(
    buf: &'a [u8],
    out: &mut Vec<u8>,
    memo: &mut HuffmanMemo,
) -> Result<(Option<&'a [u8]>, usize), DecodeError> {
    let huffman = buf.first().ok_or(DecodeError::Truncated)? & 0x80 != 0;
    let (len, n) = integer(buf, 7)?;
    let end = n.checked_add(len).ok_or(DecodeError::Truncated)?;
    let raw = buf.get(n..end).ok_or(DecodeError::Truncated)?;
    if !huffman {
        return Ok((Some(raw), end));
    }
    memo.decode(raw, out)?;
    Ok((None, end))
}

/// Decoding tables of the Huffman code.
struct Tables {
    /// By the next 8 bits: the symbol and its code's length, for codes of at most 8 bits (length
    /// zero: a longer code).
    fast: [(u16, u8); 256],
    /// Per code length: the first code of that length, how many there are, and where their
    /// symbols start in `symbols` (canonical Huffman: the codes of a length are consecutive).
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    /// Symbols ordered by (code length, code).
    symbols: Vec<u16>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let code = &httlib_huffman::encoder::table::ENCODE_TABLE;
        let mut order: Vec<u16> = (0..257).collect();
        order.sort_by_key(|&s| (code[usize::from(s)].0, code[usize::from(s)].1));
        let mut t = Tables {
            fast: [(0, 0); 256],
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols: order.clone(),
        };
        for (i, &s) in order.iter().enumerate() {
            let (len, c) = code[usize::from(s)];
            let l = usize::from(len);
            if t.count[l] == 0 {
                t.first[l] = c;
                t.offset[l] = i;
            }
            t.count[l] += 1;
            if len <= 8 {
                let spread = 1usize << (8 - len);
                let base = (c as usize) << (8 - len);
                for j in 0..spread {
                    t.fast[base + j] = (s, len);
                }
            }
        }
        t
    })
}

/// Decodes a Huffman-coded string (RFC 7541 §5.2, Appendix B) onto `out`.
fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let t = tables();
    // The bits not yet decoded, aligned to the top of `acc`.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut next = 0;
    loop {
        while bits <= 56 && next < src.len() {
            acc |= u64::from(src[next]) << (56 - bits);
            bits += 8;
            next += 1;
        }
        if bits == 0 {
            return Ok(());
        }
        let (sym, len) = t.fast[(acc >> 56) as usize];
        if len != 0 && u32::from(len) <= bits {
            out.push(sym as u8);
            acc <<= len;
            bits -= u32::from(len);
            continue;
        }
        let mut found = None;
        for l in 5..=30u32 {
            if l > bits {
                break;
            }
            let code = (acc >> (64 - l)) as u32;
            let li = l as usize;
            if t.count[li] > 0 && code >= t.first[li] && code - t.first[li] < t.count[li] {
                found = Some((t.symbols[t.offset[li] + (code - t.first[li]) as usize], l));
                break;
            }
        }
        match found {
            Some((256, _)) => return Err(DecodeError::Huffman),
            Some((sym, l)) => {
                out.push(sym as u8);
                acc <<= l;
                bits -= l;
            }
            None => {
                // What is left is no complete code: it must be padding, at most 7 bits, all
                // ones (the EOS code's first bits).
                if next < src.len() || bits > 7 {
                    return Err(DecodeError::Huffman);
                }
                let pad = (acc >> (64 - bits)) as u32;
                return if pad == (1 << bits) - 1 {
                    Ok(())
                } else {
                    Err(DecodeError::Huffman)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fields as (name, value) byte strings.
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Fields, DecodeError> {
        let mut out = Vec::new();
        d.decode(block, |n, v| out.push((n.to_vec(), v.to_vec())))?;
        Ok(out)
    }

    #[test]
    fn the_static_table_and_the_huffman_code_agree_with_another_implementation() {
        // loona-hpack (a dev-dependency) decodes every static index as this table does.
        let mut theirs = loona_hpack::Decoder::new();
        let mut ours = Decoder::new(4096);
        for i in 1..=61u8 {
            let block = [0x80 | i];
            let want: Vec<_> = theirs.decode(&block).unwrap();
            assert_eq!(decode_all(&mut ours, &block).unwrap(), want, "index {i}");
        }
        // The canonical property the decoder relies on holds for the code.
        let t = tables();
        for l in 5..=30 {
            for k in 0..t.count[l] as usize {
                let s = t.symbols[t.offset[l] + k];
                let (len, code) = httlib_huffman::encoder::table::ENCODE_TABLE[usize::from(s)];
                assert_eq!((usize::from(len), code), (l, t.first[l] + k as u32));
            }
        }
    }

    proptest! {
        #[test]
        fn huffman_strings_round_trip(s in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut coded = Vec::new();
            httlib_huffman::encode(&s, &mut coded).unwrap();
            let mut out = Vec::new();
            huffman_decode(&coded, &mut out).unwrap();
            prop_assert_eq!(out, s);
        }

        #[test]
        fn blocks_encoded_with_indexing_decode_to_the_same_fields(
            fields in prop::collection::vec(("[a-z-]{1,12}", "[ -~]{0,40}"), 1..20),
            rounds in 1usize..4,
        ) {
            // loona-hpack's encoder indexes every field it can (static and dynamic table).
            let mut encoder = loona_hpack::Encoder::new();
            let mut ours = Decoder::new(4096);
            let want: Vec<(Vec<u8>, Vec<u8>)> =
                fields.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
            for _ in 0..rounds {
                let block = encoder.encode(want.iter().map(|(n, v)| (&n[..], &v[..])));
                prop_assert_eq!(decode_all(&mut ours, &block).unwrap(), want.clone());
            }
        }

        #[test]
        fn repeated_huffman_literals_decode_the_same_from_memory(
            values in prop::collection::vec("[ -~]{0,60}", 1..8),
            order in prop::collection::vec(0usize..8, 1..40),
        ) {
            // `h2`'s way with `:path`: a Huffman literal never indexed, sent again and again,
            // among others (more distinct strings than the memo's slots, so slots are
            // replaced and reused).
            let mut ours = Decoder::new(4096);
            for i in order {
                let value = values[i % values.len()].as_bytes();
                let mut coded = Vec::new();
                httlib_huffman::encode(value, &mut coded).unwrap();
                let mut block = bytes::BytesMut::new();
                block.extend_from_slice(&[0x04]); // without indexing, name `:path` (index 4)
                crate::wire::hpack_int(&mut block, 0x80, 7, coded.len());
                block.extend_from_slice(&coded);
                let got = decode_all(&mut ours, &block).unwrap();
                prop_assert_eq!(got, vec![(b":path".to_vec(), value.to_vec())]);
            }
            prop_assert!(ours.huffman.slots.len() <= HUFFMAN_MEMO);
        }

        #[test]
        fn typed_fields_are_what_parsing_gives(
            fields in prop::collection::vec(
                (prop::sample::select(vec!["te", "date", "x-a", "x-b", "X-Up", "bad name"]),
                 "[ -~\\t\\x00]{0,3}"),
                1..200,
            ),
        ) {
            // From a small alphabet, so fields repeat, collide by name, and overflow the
            // slots; with invalid names and values among them.
            let mut typed = TypedFields::default();
            for (name, value) in fields {
                let want = http::HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .zip(http::HeaderValue::from_bytes(value.as_bytes()).ok());
                prop_assert_eq!(typed.get(name.as_bytes(), value.as_bytes()), want);
                prop_assert!(typed.slots.len() <= TYPED_FIELDS);
            }
        }

        #[test]
        fn no_input_panics(block in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut d = Decoder::new(4096);
            let _ = decode_all(&mut d, &block);
            prop_assert!(d.size <= 4096);
        }
    }

    #[test]
    fn a_field_whose_value_changes_holds_one_slot_and_repeated_fields_stay() {
        let mut typed = TypedFields::default();
        let stable: Vec<(String, String)> = (0..10)
            .map(|i| (format!("x-{i}"), format!("v{i}")))
            .collect();
        for call in 0..100 {
            for (n, v) in &stable {
                typed.get(n.as_bytes(), v.as_bytes()).unwrap();
            }
            let deadline = format!("{}u", 2_000_000 - call);
            typed.get(b"grpc-timeout", deadline.as_bytes()).unwrap();
        }
        // The ten repeated fields and one slot for the deadline.
        assert_eq!(typed.slots.len(), 11);
        // Ten more names that come once each: the CLOCK rule gives them the slots not used
        // since, and the fields every call repeats are kept.
        for i in 0..10 {
            typed.get(format!("y-{i}").as_bytes(), b"once").unwrap();
            for (n, v) in &stable {
                typed.get(n.as_bytes(), v.as_bytes()).unwrap();
            }
        }
        assert_eq!(typed.slots.len(), TYPED_FIELDS);
        for (n, v) in &stable {
            let kept = typed.slots.iter().any(|f| {
                f.raw[..f.name_len] == *n.as_bytes() && f.raw[f.name_len..] == *v.as_bytes()
            });
            assert!(kept, "{n} was pushed out");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut d = Decoder::new(4096);
        // Index 0; an index past the tables.
        assert_eq!(decode_all(&mut d, &[0x80]), Err(DecodeError::BadIndex));
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(DecodeError::BadIndex));
        // A string longer than the block.
        assert_eq!(
            decode_all(&mut d, &[0x00, 0x05, b'a']),
            Err(DecodeError::Truncated)
        );
        // An integer beyond 2^28.
        assert_eq!(
            decode_all(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(DecodeError::Truncated)
        );
        // A size update above the allowed size, and one after a field.
        assert_eq!(
            decode_all(&mut d, &[0x3f, 0xe2, 0x1f]),
            Err(DecodeError::SizeUpdate)
        );
        assert_eq!(
            decode_all(&mut d, &[0x82, 0x20]),
            Err(DecodeError::SizeUpdate)
        );
        // Huffman: padding of zeros; EOS inside the string (30 one-bits).
        assert_eq!(
            decode_all(&mut d, &[0x00, 0x01, b'a', 0x81, 0x00]),
            Err(DecodeError::Huffman)
        );
        assert_eq!(
            decode_all(&mut d, &[0x00, 0x01, b'a', 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Huffman)
        );
    }

    #[test]
    fn the_dynamic_table_evicts_and_honours_size_updates() {
        let mut d = Decoder::new(100);
        // "aaaa: bbbb" with incremental indexing: 40 bytes an entry.
        let field = |c: u8| [0x40, 4, c, c, c, c, 4, b'v', b'v', b'v', b'v'];
        decode_all(&mut d, &field(b'a')).unwrap();
        decode_all(&mut d, &field(b'b')).unwrap();
        decode_all(&mut d, &field(b'c')).unwrap(); // evicts "aaaa"
        assert_eq!(d.size, 80);
        assert_eq!(decode_all(&mut d, &[0xbe]).unwrap()[0].0, b"cccc"); // index 62: newest
        assert_eq!(decode_all(&mut d, &[0xbf]).unwrap()[0].0, b"bbbb");
        assert_eq!(
            decode_all(&mut d, &[0xc0, 0x00]),
            Err(DecodeError::BadIndex)
        );
        // A size update to zero empties it.
        decode_all(&mut d, &[0x20]).unwrap();
        assert_eq!(d.size, 0);
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(DecodeError::BadIndex));
    }
}
