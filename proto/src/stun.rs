//! STUN Binding (RFC 5389) as netcheck and the DERP server's STUN port use it: build and parse
//! requests and success responses. Only what discovering a reflexive address needs: no
//! authentication, no MESSAGE-INTEGRITY, no retransmission (the caller's sans-IO core owns
//! timing and transaction ids).
//!
//! Tailscale's `derper` answers only requests that carry `SOFTWARE` = [`SOFTWARE_TAILNODE`]
//! and end in a valid `FINGERPRINT`; send that to be answered by stock relays. warren's own
//! [`parse_request`] accepts any Binding request, checking the fingerprint when one is present.
//!
//! A server answering any standard client reads requests with [`parse_binding_request`]: it
//! also takes classic RFC 3489 requests (no magic cookie, a 16-byte transaction id), reads
//! CHANGE-REQUEST (RFC 5780) and lists the comprehension-required attributes it does not
//! understand, which must be answered with [`build_unknown_attributes_error`] (RFC 8489
//! §6.3.1) instead of [`build_binding_success`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A STUN transaction id.
pub type TxId = [u8; 12];

/// The magic cookie at bytes 4..8 of every RFC 5389 message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// The fixed STUN header length.
pub const HEADER_LEN: usize = 20;
/// The `SOFTWARE` value Tailscale's STUN server requires of requests.
pub const SOFTWARE_TAILNODE: &[u8] = b"tailnode";
/// The longest `SOFTWARE` value RFC 5389 allows, in bytes; longer values are cut.
pub const MAX_SOFTWARE_LEN: usize = 763;

/// The ERROR-CODE of an answer to a request with comprehension-required attributes the server
/// does not understand (listed in UNKNOWN-ATTRIBUTES).
pub const ERROR_UNKNOWN_ATTRIBUTE: u16 = 420;
/// The CHANGE-REQUEST attribute (RFC 5780 §7.2, RFC 3489 §11.2.4).
pub const ATTR_CHANGE_REQUEST: u16 = 0x0003;
/// At most this many types are listed in [`BindingRequest::unknown`] (and so in an
/// UNKNOWN-ATTRIBUTES answer), whatever the request holds.
pub const MAX_UNKNOWN_ATTRIBUTES: usize = 16;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_SOURCE_ADDRESS: u16 = 0x0004;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
/// Comprehension-required attributes a server without authentication understands in a
/// Binding request: those RFC 8489 defines (it ignores credentials it never asked for), the
/// RFC 3489 ones that ask nothing of it, and CHANGE-REQUEST. RESPONSE-ADDRESS (0x0002) and
/// RFC 5780's RESPONSE-PORT and PADDING are not: the server never answers elsewhere.
const UNDERSTOOD: [u16; 16] = [
    0x0001, // MAPPED-ADDRESS
    ATTR_CHANGE_REQUEST,
    0x0004, // SOURCE-ADDRESS (RFC 3489)
    0x0005, // CHANGED-ADDRESS (RFC 3489)
    0x0006, // USERNAME
    0x0007, // PASSWORD (RFC 3489)
    0x0008, // MESSAGE-INTEGRITY
    0x0009, // ERROR-CODE
    0x000A, // UNKNOWN-ATTRIBUTES
    0x000B, // REFLECTED-FROM (RFC 3489)
    0x0014, // REALM
    0x0015, // NONCE
    0x001C, // MESSAGE-INTEGRITY-SHA256
    0x001D, // PASSWORD-ALGORITHM
    0x001E, // USERHASH
    0x0020, // XOR-MAPPED-ADDRESS
];
const CHANGE_IP: u8 = 0x04;
const CHANGE_PORT: u8 = 0x02;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// XOR-MAPPED-ADDRESS in the comprehension-optional range, as some servers send it.
const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554E;
const FINGERPRINT_ATTR_LEN: usize = 8;
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// Why bytes were not the STUN message expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Shorter than a header, top bits set, or no magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message, but not a Binding request.
    #[error("STUN message type {message_type:#06x} is not a Binding request")]
    NotBindingRequest {
        /// The message type found.
        message_type: u16,
    },
    /// A STUN message, but not a Binding success response.
    #[error("STUN message type {message_type:#06x} is not a Binding success response")]
    NotSuccessResponse {
        /// The message type found.
        message_type: u16,
    },
    /// The header's length is not a multiple of 4 or runs past the datagram.
    #[error("STUN length {declared} does not fit the {available} bytes after the header")]
    BadLength {
        /// The length in the header.
        declared: usize,
        /// The bytes present after the header.
        available: usize,
    },
    /// An attribute header or value runs past the message.
    #[error("malformed STUN attribute at offset {offset}")]
    MalformedAttribute {
        /// Offset of the attribute from the start of the message.
        offset: usize,
    },
    /// An address attribute had an unknown family.
    #[error("unknown STUN address family {family:#04x}")]
    BadAddressFamily {
        /// The family byte.
        family: u8,
    },
    /// An attribute followed FINGERPRINT, which must be last.
    #[error("STUN FINGERPRINT is not the last attribute")]
    FingerprintNotLast,
    /// The FINGERPRINT did not match the message.
    #[error("STUN FINGERPRINT {found:#010x} does not match {expected:#010x}")]
    BadFingerprint {
        /// The value computed from the message.
        expected: u32,
        /// The value in the message.
        found: u32,
    },
    /// A success response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS.
    #[error("STUN response carries no mapped address")]
    NoMappedAddress,
    /// A STUN message, but not a Binding error response.
    #[error("STUN message type {message_type:#06x} is not a Binding error response")]
    NotErrorResponse {
        /// The message type found.
        message_type: u16,
    },
    /// An error response without ERROR-CODE.
    #[error("STUN error response carries no ERROR-CODE")]
    NoErrorCode,
}

/// Whether a datagram looks like STUN: at least a header, the top two bits zero, and the magic
/// cookie at bytes 4..8. Used to demultiplex the shared UDP socket.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf.first().is_some_and(|b| b & 0xC0 == 0)
        && buf.get(4..8) == Some(&MAGIC_COOKIE[..])
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as FINGERPRINT uses.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, b| {
        TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8)
    })
}

fn fingerprint(message_before_fp: &[u8]) -> u32 {
    crc32(message_before_fp) ^ FINGERPRINT_XOR
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// The length of the request [`build_request`] writes for this `software`.
pub fn request_len(software: Option<&[u8]>) -> usize {
    let software_attr =
        software.map_or(0, |s| 4 + s.len().min(MAX_SOFTWARE_LEN).next_multiple_of(4));
    HEADER_LEN + software_attr + FINGERPRINT_ATTR_LEN
}

/// Appends a Binding request with transaction id `txid`, an optional SOFTWARE attribute and a
/// FINGERPRINT. Pass `Some(SOFTWARE_TAILNODE)` to be answered by Tailscale's `derper`.
pub fn build_request(txid: TxId, software: Option<&[u8]>, out: &mut Vec<u8>) {
    let start = out.len();
    let total = request_len(software);
    out.reserve(total);
    put_u16(out, BINDING_REQUEST);
    // At most 4 + 764 + 8 bytes follow the header, well within u16.
    put_u16(out, u16::try_from(total - HEADER_LEN).unwrap_or(u16::MAX));
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(&txid);
    if let Some(software) = software {
        let software = software.get(..MAX_SOFTWARE_LEN).unwrap_or(software);
        put_u16(out, ATTR_SOFTWARE);
        put_u16(out, u16::try_from(software.len()).unwrap_or(u16::MAX));
        out.extend_from_slice(software);
        let padded = software.len().next_multiple_of(4);
        out.resize(out.len() + padded - software.len(), 0);
    }
    let fp = fingerprint(out.get(start..).unwrap_or_default());
    put_u16(out, ATTR_FINGERPRINT);
    put_u16(out, 4);
    out.extend_from_slice(&fp.to_be_bytes());
}

/// One attribute: its type, its value (padding stripped) and its offset in the message.
struct Attr<'a> {
    ty: u16,
    value: &'a [u8],
    offset: usize,
}

/// A request's transaction, which the answer must echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transaction {
    /// RFC 5389/8489: the magic cookie, then a 12-byte id.
    Rfc5389(TxId),
    /// Classic RFC 3489 STUN: no magic cookie; the 16 bytes after the length are the id.
    Rfc3489([u8; 16]),
}

/// The flags of a CHANGE-REQUEST attribute; both false when the request has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeRequest {
    /// Answer from another IP address.
    pub change_ip: bool,
    /// Answer from another port.
    pub change_port: bool,
}

/// A Binding request as a server reads it ([`parse_binding_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRequest {
    /// The transaction to answer.
    pub transaction: Transaction,
    /// What CHANGE-REQUEST asks of the answer.
    pub change: ChangeRequest,
    /// Comprehension-required attributes (type below 0x8000) this codec does not understand,
    /// in the order first seen, without repeats, at most [`MAX_UNKNOWN_ATTRIBUTES`]. When not
    /// empty the request must get a 420 answer, not a success (RFC 8489 §6.3.1).
    pub unknown: Vec<u16>,
}

/// Reads the 20-byte header of a message with or without the magic cookie: its type, its
/// transaction and the attribute bytes its length covers (bytes past it are ignored, as
/// Tailscale does).
fn split_header(buf: &[u8]) -> Result<(u16, Transaction, &[u8]), StunError> {
    let (header, body) = buf
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(StunError::NotStun)?;
    let [t0, t1, l0, l1, id @ ..] = *header;
    if t0 & 0xC0 != 0 {
        return Err(StunError::NotStun);
    }
    let transaction = match id.split_first_chunk::<4>() {
        Some((cookie, tx)) if *cookie == MAGIC_COOKIE => {
            Transaction::Rfc5389(*tx.first_chunk::<12>().ok_or(StunError::NotStun)?)
        }
        _ => Transaction::Rfc3489(id),
    };
    let declared = usize::from(u16::from_be_bytes([l0, l1]));
    let bad_length = StunError::BadLength {
        declared,
        available: body.len(),
    };
    if declared % 4 != 0 {
        return Err(bad_length);
    }
    let body = body.get(..declared).ok_or(bad_length)?;
    Ok((u16::from_be_bytes([t0, t1]), transaction, body))
}

/// Splits `body` (which starts at [`HEADER_LEN`] in `buf`) into attributes. With `fingerprint`
/// (RFC 5389 messages), a FINGERPRINT must be last and correct.
fn split_attributes<'a>(
    buf: &[u8],
    body: &'a [u8],
    fingerprint_checked: bool,
) -> Result<Vec<Attr<'a>>, StunError> {
    let mut attrs = Vec::new();
    let mut at = 0;
    let mut fingerprint_seen = false;
    while at < body.len() {
        let offset = HEADER_LEN + at;
        let malformed = StunError::MalformedAttribute { offset };
        if fingerprint_seen {
            return Err(StunError::FingerprintNotLast);
        }
        let rest = body.get(at..).ok_or_else(|| malformed.clone())?;
        let (&[a0, a1, v0, v1], rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| malformed.clone())?;
        let ty = u16::from_be_bytes([a0, a1]);
        let len = usize::from(u16::from_be_bytes([v0, v1]));
        let value = rest.get(..len).ok_or_else(|| malformed.clone())?;
        let padded = len.next_multiple_of(4);
        if rest.len() < padded {
            return Err(malformed);
        }
        if fingerprint_checked && ty == ATTR_FINGERPRINT {
            let found = u32::from_be_bytes(*value.first_chunk::<4>().ok_or(malformed)?);
            let expected = fingerprint(buf.get(..offset).unwrap_or_default());
            if found != expected {
                return Err(StunError::BadFingerprint { expected, found });
            }
            fingerprint_seen = true;
        }
        attrs.push(Attr { ty, value, offset });
        at += 4 + padded;
    }
    Ok(attrs)
}

/// Checks the header, length, attribute layout and (if present) FINGERPRINT of an RFC 5389
/// message; returns its type, transaction id and attributes.
fn parse_message(buf: &[u8]) -> Result<(u16, TxId, Vec<Attr<'_>>), StunError> {
    if !is_stun(buf) {
        return Err(StunError::NotStun);
    }
    let (message_type, transaction, body) = split_header(buf)?;
    let Transaction::Rfc5389(tx) = transaction else {
        return Err(StunError::NotStun);
    };
    Ok((message_type, tx, split_attributes(buf, body, true)?))
}

/// Parses a Binding request as a server answering any client must: RFC 5389/8489 requests
/// (a FINGERPRINT, when present, must be last and correct) and classic RFC 3489 ones (no magic
/// cookie). Reads CHANGE-REQUEST and collects the comprehension-required attributes not
/// understood ([`BindingRequest::unknown`]); comprehension-optional ones are skipped.
pub fn parse_binding_request(buf: &[u8]) -> Result<BindingRequest, StunError> {
    let (message_type, transaction, body) = split_header(buf)?;
    if message_type != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest { message_type });
    }
    let modern = matches!(transaction, Transaction::Rfc5389(_));
    let mut change = ChangeRequest::default();
    let mut unknown = Vec::new();
    for attr in split_attributes(buf, body, modern)? {
        if attr.ty == ATTR_CHANGE_REQUEST {
            let flags = attr
                .value
                .first_chunk::<4>()
                .ok_or(StunError::MalformedAttribute {
                    offset: attr.offset,
                })?[3];
            change.change_ip |= flags & CHANGE_IP != 0;
            change.change_port |= flags & CHANGE_PORT != 0;
        } else if attr.ty < 0x8000
            && !UNDERSTOOD.contains(&attr.ty)
            && !unknown.contains(&attr.ty)
            && unknown.len() < MAX_UNKNOWN_ATTRIBUTES
        {
            unknown.push(attr.ty);
        }
    }
    Ok(BindingRequest {
        transaction,
        change,
        unknown,
    })
}

/// Appends a message header for `transaction` with `body_len` bytes of attributes to follow.
fn put_header(message_type: u16, transaction: Transaction, body_len: usize, out: &mut Vec<u8>) {
    put_u16(out, message_type);
    // Every body built here is a few dozen bytes.
    put_u16(out, u16::try_from(body_len).unwrap_or(u16::MAX));
    match transaction {
        Transaction::Rfc5389(tx) => {
            out.extend_from_slice(&MAGIC_COOKIE);
            out.extend_from_slice(&tx);
        }
        Transaction::Rfc3489(id) => out.extend_from_slice(&id),
    }
}

/// Appends a plain (not XORed) address attribute of type `ty`.
fn put_address(ty: u16, addr: SocketAddr, out: &mut Vec<u8>) {
    let (family, octets): (u8, Vec<u8>) = match unmap(addr.ip()) {
        IpAddr::V4(v4) => (FAMILY_IPV4, v4.octets().to_vec()),
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets().to_vec()),
    };
    put_u16(out, ty);
    put_u16(out, u16::try_from(4 + octets.len()).unwrap_or(u16::MAX));
    out.push(0);
    out.push(family);
    put_u16(out, addr.port());
    out.extend_from_slice(&octets);
}

fn address_attr_len(addr: SocketAddr) -> usize {
    match unmap(addr.ip()) {
        IpAddr::V4(_) => 4 + 8,
        IpAddr::V6(_) => 4 + 20,
    }
}

/// Appends the success answer to a request read by [`parse_binding_request`], `mapped` being
/// the request's source. An RFC 5389 request gets what [`build_response`] writes (only
/// XOR-MAPPED-ADDRESS, like Tailscale's); a classic RFC 3489 one gets MAPPED-ADDRESS, and
/// SOURCE-ADDRESS when `source` (where the answer is sent from) is known.
pub fn build_binding_success(
    transaction: Transaction,
    mapped: SocketAddr,
    source: Option<SocketAddr>,
    out: &mut Vec<u8>,
) {
    match transaction {
        Transaction::Rfc5389(tx) => build_response(tx, mapped, out),
        Transaction::Rfc3489(_) => {
            let body = address_attr_len(mapped) + source.map_or(0, address_attr_len);
            put_header(BINDING_SUCCESS, transaction, body, out);
            put_address(ATTR_MAPPED_ADDRESS, mapped, out);
            if let Some(source) = source {
                put_address(ATTR_SOURCE_ADDRESS, source, out);
            }
        }
    }
}

/// Appends a Binding error answer with ERROR-CODE 420 (Unknown Attribute) and
/// UNKNOWN-ATTRIBUTES listing `unknown` (at most [`MAX_UNKNOWN_ATTRIBUTES`] are written; the
/// list is padded by repeating its last type, as RFC 3489 asks and RFC 8489 allows).
pub fn build_unknown_attributes_error(
    transaction: Transaction,
    unknown: &[u16],
    out: &mut Vec<u8>,
) {
    const REASON: &[u8] = b"Unknown Attribute";
    let unknown = unknown.get(..MAX_UNKNOWN_ATTRIBUTES).unwrap_or(unknown);
    let error_len = 4 + REASON.len();
    let list_len = 2 * unknown.len();
    let body = 4 + error_len.next_multiple_of(4) + 4 + list_len.next_multiple_of(4);
    put_header(BINDING_ERROR, transaction, body, out);
    put_u16(out, ATTR_ERROR_CODE);
    put_u16(out, u16::try_from(error_len).unwrap_or(u16::MAX));
    let [class, number] = [ERROR_UNKNOWN_ATTRIBUTE / 100, ERROR_UNKNOWN_ATTRIBUTE % 100];
    out.extend_from_slice(&[0, 0]);
    out.extend(u8::try_from(class).ok());
    out.extend(u8::try_from(number).ok());
    out.extend_from_slice(REASON);
    out.resize(out.len() + error_len.next_multiple_of(4) - error_len, 0);
    put_u16(out, ATTR_UNKNOWN_ATTRIBUTES);
    put_u16(out, u16::try_from(list_len).unwrap_or(u16::MAX));
    for ty in unknown {
        put_u16(out, *ty);
    }
    if let Some(last) = unknown.last().filter(|_| unknown.len() % 2 == 1) {
        put_u16(out, *last);
    }
}

/// Reads a Binding error answer: its transaction, ERROR-CODE (class * 100 + number) and the
/// types listed in UNKNOWN-ATTRIBUTES (empty when absent). For clients and tests.
pub fn parse_error_response(buf: &[u8]) -> Result<(Transaction, u16, Vec<u16>), StunError> {
    let (message_type, transaction, body) = split_header(buf)?;
    if message_type != BINDING_ERROR {
        return Err(StunError::NotErrorResponse { message_type });
    }
    let modern = matches!(transaction, Transaction::Rfc5389(_));
    let mut code = None;
    let mut unknown = Vec::new();
    for attr in split_attributes(buf, body, modern)? {
        let malformed = StunError::MalformedAttribute {
            offset: attr.offset,
        };
        match attr.ty {
            ATTR_ERROR_CODE => {
                let [_, _, class, number] = *attr.value.first_chunk::<4>().ok_or(malformed)?;
                code = Some(u16::from(class & 0x07) * 100 + u16::from(number));
            }
            ATTR_UNKNOWN_ATTRIBUTES => {
                unknown = attr
                    .value
                    .chunks_exact(2)
                    .map(|t| u16::from_be_bytes([t[0], t[1]]))
                    .collect();
                unknown.dedup();
            }
            _ => {}
        }
    }
    Ok((transaction, code.ok_or(StunError::NoErrorCode)?, unknown))
}

/// Reads a classic RFC 3489 Binding success answer: its 16-byte transaction id and its
/// MAPPED-ADDRESS. For tests of classic clients.
pub fn parse_classic_response(buf: &[u8]) -> Result<([u8; 16], SocketAddr), StunError> {
    let (message_type, transaction, body) = split_header(buf)?;
    if message_type != BINDING_SUCCESS {
        return Err(StunError::NotSuccessResponse { message_type });
    }
    let Transaction::Rfc3489(id) = transaction else {
        return Err(StunError::NotStun);
    };
    for attr in split_attributes(buf, body, false)? {
        if attr.ty == ATTR_MAPPED_ADDRESS {
            return Ok((id, decode_address(attr.value, attr.offset, None)?));
        }
    }
    Err(StunError::NoMappedAddress)
}

/// Parses a Binding request (server side) and returns its transaction id. SOFTWARE is not
/// required; a FINGERPRINT, when present, must be last and correct.
pub fn parse_request(buf: &[u8]) -> Result<TxId, StunError> {
    let (message_type, txid, _) = parse_message(buf)?;
    if message_type != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest { message_type });
    }
    Ok(txid)
}

/// The length of the response [`build_response`] writes for `addr`.
pub fn response_len(addr: SocketAddr) -> usize {
    let ip_len = match unmap(addr.ip()) {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    };
    HEADER_LEN + 4 + 4 + ip_len
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Appends a Binding success response for `txid` whose XOR-MAPPED-ADDRESS is `addr` (the
/// request's source). A v4-mapped IPv6 source, as a dual-stack socket reports it, is answered
/// as IPv4. Like Tailscale's, the response carries no other attribute.
pub fn build_response(txid: TxId, addr: SocketAddr, out: &mut Vec<u8>) {
    let ip = unmap(addr.ip());
    let (family, octets): (u8, Vec<u8>) = match ip {
        IpAddr::V4(v4) => (FAMILY_IPV4, v4.octets().to_vec()),
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets().to_vec()),
    };
    let value_len = 4 + octets.len();
    out.reserve(HEADER_LEN + 4 + value_len);
    put_u16(out, BINDING_SUCCESS);
    // 4 + 4 + 16 at most.
    put_u16(out, u16::try_from(4 + value_len).unwrap_or(u16::MAX));
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(&txid);
    put_u16(out, ATTR_XOR_MAPPED_ADDRESS);
    put_u16(out, u16::try_from(value_len).unwrap_or(u16::MAX));
    out.push(0);
    out.push(family);
    put_u16(
        out,
        addr.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]),
    );
    let mask = MAGIC_COOKIE.iter().chain(txid.iter());
    out.extend(octets.iter().zip(mask).map(|(b, m)| b ^ m));
}

/// Decodes an address attribute value; `xor` holds the mask for XOR-MAPPED-ADDRESS.
fn decode_address(
    value: &[u8],
    offset: usize,
    xor: Option<&TxId>,
) -> Result<SocketAddr, StunError> {
    let malformed = StunError::MalformedAttribute { offset };
    let (&[_, family, p0, p1], addr) = value
        .split_first_chunk::<4>()
        .ok_or_else(|| malformed.clone())?;
    let mut port = u16::from_be_bytes([p0, p1]);
    let mut mask = [0u8; 16];
    if let Some(txid) = xor {
        port ^= u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
        mask[..4].copy_from_slice(&MAGIC_COOKIE);
        mask[4..].copy_from_slice(txid);
    }
    let ip = match family {
        FAMILY_IPV4 => {
            let a = addr.first_chunk::<4>().ok_or(malformed)?;
            let mut o = [0u8; 4];
            for (i, byte) in o.iter_mut().enumerate() {
                *byte = a[i] ^ mask[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        FAMILY_IPV6 => {
            let a = addr.first_chunk::<16>().ok_or(malformed)?;
            let mut o = [0u8; 16];
            for (i, byte) in o.iter_mut().enumerate() {
                *byte = a[i] ^ mask[i];
            }
            unmap(IpAddr::V6(Ipv6Addr::from(o)))
        }
        family => return Err(StunError::BadAddressFamily { family }),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Parses a Binding success response: its transaction id and the mapped address, from
/// XOR-MAPPED-ADDRESS (0x0020, or 0x8020 as some servers send it), else MAPPED-ADDRESS.
/// A FINGERPRINT, when present, must be last and correct; other attributes are skipped.
pub fn parse_response(buf: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    let (message_type, txid, attrs) = parse_message(buf)?;
    if message_type != BINDING_SUCCESS {
        return Err(StunError::NotSuccessResponse { message_type });
    }
    let mut xor_mapped = None;
    let mut mapped = None;
    for attr in attrs {
        match attr.ty {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT => {
                xor_mapped = Some(decode_address(attr.value, attr.offset, Some(&txid))?);
            }
            ATTR_MAPPED_ADDRESS => {
                mapped = Some(decode_address(attr.value, attr.offset, None)?);
            }
            _ => {}
        }
    }
    let addr = xor_mapped.or(mapped).ok_or(StunError::NoMappedAddress)?;
    Ok((txid, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect()
    }

    const RFC_TXID: TxId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.1, sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY, FINGERPRINT).
    const RFC_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
        fa 87 df ae 80 22 00 10 53 54 55 4e 20 74 65 73
        74 20 63 6c 69 65 6e 74 00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36 00 06 00 09
        65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
        9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49
        c1 b5 71 a2 80 28 00 04 e5 7a 3b cf";

    /// RFC 5769 §2.2, sample IPv4 response: 192.0.2.1:32853.
    const RFC_RESPONSE_V4: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
        fa 87 df ae 80 22 00 0b 74 65 73 74 20 76 65 63
        74 6f 72 20 00 20 00 08 00 01 a1 47 e1 12 a6 43
        00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9
        2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96";

    /// RFC 5769 §2.3, sample IPv6 response: [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    const RFC_RESPONSE_V6: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
        fa 87 df ae 80 22 00 0b 74 65 73 74 20 76 65 63
        74 6f 72 20 00 20 00 14 00 02 a1 47 01 13 a9 fa
        a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9 00 08 00 14
        a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75
        bf e3 ed 41 80 28 00 04 c8 fb 0b 4c";

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn rfc5769_vectors() {
        assert_eq!(parse_request(&hex(RFC_REQUEST)), Ok(RFC_TXID));
        assert_eq!(
            parse_response(&hex(RFC_RESPONSE_V4)),
            Ok((RFC_TXID, "192.0.2.1:32853".parse().expect("addr")))
        );
        assert_eq!(
            parse_response(&hex(RFC_RESPONSE_V6)),
            Ok((
                RFC_TXID,
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .expect("addr")
            ))
        );
        // Our XOR-MAPPED-ADDRESS encoding equals the RFC's bytes.
        let mut out = Vec::new();
        build_response(RFC_TXID, "192.0.2.1:32853".parse().expect("addr"), &mut out);
        assert_eq!(&out[20..], &hex(RFC_RESPONSE_V4)[36..48]);
        let mut out = Vec::new();
        build_response(
            RFC_TXID,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .expect("addr"),
            &mut out,
        );
        assert_eq!(&out[20..], &hex(RFC_RESPONSE_V6)[36..60]);
    }

    #[test]
    fn tailscale_request_bytes() {
        // Tailscale's request: header, SOFTWARE "tailnode", FINGERPRINT; 8 + 8 bytes of attributes.
        let mut out = Vec::new();
        build_request([1; 12], Some(SOFTWARE_TAILNODE), &mut out);
        assert_eq!(out.len(), request_len(Some(SOFTWARE_TAILNODE)));
        assert_eq!(&out[..4], &[0x00, 0x01, 0x00, 0x14]);
        assert_eq!(&out[4..8], &MAGIC_COOKIE);
        assert_eq!(&out[20..32], b"\x80\x22\x00\x08tailnode");
        assert_eq!(&out[32..36], &[0x80, 0x28, 0x00, 0x04]);
        let fp = u32::from_be_bytes(out[36..40].try_into().expect("4 bytes"));
        assert_eq!(fp, crc32(&out[..32]) ^ 0x5354_554E);
        assert!(is_stun(&out));
        assert_eq!(parse_request(&out), Ok([1; 12]));
    }

    #[test]
    fn round_trips() {
        for software in [
            None,
            Some(&b"warren"[..]),
            Some(SOFTWARE_TAILNODE),
            Some(&b""[..]),
        ] {
            let mut out = vec![0xee]; // appends, does not overwrite
            build_request([7; 12], software, &mut out);
            assert_eq!(out.len() - 1, request_len(software));
            assert_eq!(parse_request(&out[1..]), Ok([7; 12]));
        }
        for addr in [
            "1.2.3.4:5",
            "[2001:db8::9]:65535",
            "[::ffff:10.0.0.1]:41641",
        ] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let mut out = Vec::new();
            build_response([3; 12], addr, &mut out);
            assert_eq!(out.len(), response_len(addr));
            let (txid, got) = parse_response(&out).expect("parses");
            assert_eq!(txid, [3; 12]);
            assert_eq!(got, SocketAddr::new(unmap(addr.ip()), addr.port()));
        }
    }

    #[test]
    fn mapped_address_fallback_and_alt_type() {
        let mut msg = hex("01 01 00 0c 21 12 a4 42");
        msg.extend_from_slice(&RFC_TXID);
        msg.extend_from_slice(&hex("00 01 00 08 00 01 80 55 c0 00 02 01"));
        assert_eq!(
            parse_response(&msg),
            Ok((RFC_TXID, "192.0.2.1:32853".parse().expect("addr")))
        );
        let mut alt = hex("01 01 00 0c 21 12 a4 42");
        alt.extend_from_slice(&RFC_TXID);
        alt.extend_from_slice(&hex("80 20 00 08 00 01 a1 47 e1 12 a6 43"));
        assert_eq!(
            parse_response(&alt),
            Ok((RFC_TXID, "192.0.2.1:32853".parse().expect("addr")))
        );
    }

    #[test]
    fn malformed_inputs_are_typed_errors() {
        let request = hex(RFC_REQUEST);
        let response = hex(RFC_RESPONSE_V4);
        for cut in 0..request.len() {
            assert!(parse_request(&request[..cut]).is_err(), "cut {cut}");
        }
        for cut in 0..response.len() {
            assert!(parse_response(&response[..cut]).is_err(), "cut {cut}");
        }
        for cut in 0..HEADER_LEN {
            assert_eq!(parse_request(&request[..cut]), Err(StunError::NotStun));
        }
        assert_eq!(
            parse_request(&response),
            Err(StunError::NotBindingRequest {
                message_type: 0x0101
            })
        );
        assert_eq!(
            parse_response(&request),
            Err(StunError::NotSuccessResponse {
                message_type: 0x0001
            })
        );
        let mut bad_fp = response.clone();
        bad_fp[79] ^= 1;
        assert!(matches!(
            parse_response(&bad_fp),
            Err(StunError::BadFingerprint { .. })
        ));
        let mut bad_cookie = response.clone();
        bad_cookie[4] = 0;
        assert_eq!(parse_response(&bad_cookie), Err(StunError::NotStun));
        let mut odd_len = response.clone();
        odd_len[3] = 0x3b;
        assert!(matches!(
            parse_response(&odd_len),
            Err(StunError::BadLength { declared: 0x3b, .. })
        ));
        // Attribute length running past the message.
        let mut long_attr = hex("01 01 00 08 21 12 a4 42");
        long_attr.extend_from_slice(&RFC_TXID);
        long_attr.extend_from_slice(&hex("00 20 00 08 00 01 a1 47"));
        assert_eq!(
            parse_response(&long_attr),
            Err(StunError::MalformedAttribute { offset: 20 })
        );
        // Bad family, short address.
        let mut fam = hex("01 01 00 0c 21 12 a4 42");
        fam.extend_from_slice(&RFC_TXID);
        fam.extend_from_slice(&hex("00 20 00 08 00 03 a1 47 e1 12 a6 43"));
        assert_eq!(
            parse_response(&fam),
            Err(StunError::BadAddressFamily { family: 3 })
        );
        let mut short = hex("01 01 00 08 21 12 a4 42");
        short.extend_from_slice(&RFC_TXID);
        short.extend_from_slice(&hex("00 20 00 04 00 02 a1 47"));
        assert_eq!(
            parse_response(&short),
            Err(StunError::MalformedAttribute { offset: 20 })
        );
        let mut none = hex("01 01 00 00 21 12 a4 42");
        none.extend_from_slice(&RFC_TXID);
        assert_eq!(parse_response(&none), Err(StunError::NoMappedAddress));
        // Anything after FINGERPRINT.
        let mut req = Vec::new();
        build_request([1; 12], None, &mut req);
        req[3] += 4;
        let fp = fingerprint(&req[..20]).to_be_bytes();
        req[24..28].copy_from_slice(&fp);
        req.extend_from_slice(&hex("80 22 00 00"));
        assert_eq!(parse_request(&req), Err(StunError::FingerprintNotLast));
    }

    /// What Debian's `stun` client (RFC 3489) sends: test I, then change-IP, then change-port.
    const CLASSIC_TEST_I: &str = "0001 0008 0186897f ea67f73b 1e61ad05 e4c4b143 0003 0004 00000000";
    const CLASSIC_CHANGE_IP: &str =
        "0001 0008 022bfc2b 179cf73c 2af52825 ddf03a5e 0003 0004 00000004";
    const CLASSIC_CHANGE_PORT: &str =
        "0001 0008 0395b641 85624659 1e07327e 59fe345e 0003 0004 00000002";

    fn hex_words(text: &str) -> Vec<u8> {
        let digits: String = text.split_whitespace().collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn classic_requests_are_read_with_their_change_flags() {
        let test_i = parse_binding_request(&hex_words(CLASSIC_TEST_I)).expect("classic");
        let Transaction::Rfc3489(id) = test_i.transaction else {
            panic!("classic transaction expected: {test_i:?}");
        };
        assert_eq!(&id[..4], &[0x01, 0x86, 0x89, 0x7f]);
        assert_eq!(test_i.change, ChangeRequest::default());
        assert!(test_i.unknown.is_empty());
        let ip = parse_binding_request(&hex_words(CLASSIC_CHANGE_IP)).expect("classic");
        assert_eq!(
            ip.change,
            ChangeRequest {
                change_ip: true,
                change_port: false
            }
        );
        let port = parse_binding_request(&hex_words(CLASSIC_CHANGE_PORT)).expect("classic");
        assert_eq!(
            port.change,
            ChangeRequest {
                change_ip: false,
                change_port: true
            }
        );
        // The netcheck parser and the demultiplexer still want the cookie.
        assert_eq!(
            parse_request(&hex_words(CLASSIC_TEST_I)),
            Err(StunError::NotStun)
        );
        assert!(!is_stun(&hex_words(CLASSIC_TEST_I)));
        // Modern requests read the same as before.
        let mut req = Vec::new();
        build_request([5; 12], Some(SOFTWARE_TAILNODE), &mut req);
        assert_eq!(
            parse_binding_request(&req),
            Ok(BindingRequest {
                transaction: Transaction::Rfc5389([5; 12]),
                change: ChangeRequest::default(),
                unknown: vec![],
            })
        );
    }

    #[test]
    fn classic_success_carries_mapped_and_source_address() {
        let id: [u8; 16] = core::array::from_fn(|i| u8::try_from(i).expect("small"));
        let mapped: SocketAddr = "192.0.2.1:32853".parse().expect("addr");
        let source: SocketAddr = "198.51.100.2:3478".parse().expect("addr");
        let mut out = Vec::new();
        build_binding_success(Transaction::Rfc3489(id), mapped, Some(source), &mut out);
        let mut expected = hex("01 01 00 18");
        expected.extend_from_slice(&id);
        expected.extend_from_slice(&hex("00 01 00 08 00 01 80 55 c0 00 02 01"));
        expected.extend_from_slice(&hex("00 04 00 08 00 01 0d 96 c6 33 64 02"));
        assert_eq!(out, expected);
        assert_eq!(parse_classic_response(&out), Ok((id, mapped)));
        // An RFC 5389 request gets the usual XOR-MAPPED-ADDRESS answer, nothing else.
        let mut modern = Vec::new();
        build_binding_success(
            Transaction::Rfc5389([3; 12]),
            mapped,
            Some(source),
            &mut modern,
        );
        let mut plain = Vec::new();
        build_response([3; 12], mapped, &mut plain);
        assert_eq!(modern, plain);
    }

    /// A request with `attrs` (type, value) after the header, RFC 5389 form.
    fn request_with(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (ty, value) in attrs {
            put_u16(&mut body, *ty);
            put_u16(&mut body, u16::try_from(value.len()).expect("short"));
            body.extend_from_slice(value);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut out = Vec::new();
        put_header(
            BINDING_REQUEST,
            Transaction::Rfc5389([4; 12]),
            body.len(),
            &mut out,
        );
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn unknown_comprehension_required_attributes_are_listed() {
        let req = request_with(&[
            (0x8022, b"warren"),           // SOFTWARE: optional, understood
            (0x7777, b"x"),                // unknown, required
            (0x8fff, b"later"),            // unknown, optional: skipped
            (0x0006, b"user"),             // USERNAME: understood
            (0x0027, &[0x12, 0x34, 0, 0]), // RESPONSE-PORT: not honoured
            (0x7777, b"again"),            // listed once
        ]);
        let parsed = parse_binding_request(&req).expect("parses");
        assert_eq!(parsed.unknown, vec![0x7777, 0x0027]);
        // RFC 5769's sample carries ICE's PRIORITY, which a plain STUN server does not know.
        let sample = parse_binding_request(&hex(RFC_REQUEST)).expect("parses");
        assert_eq!(sample.transaction, Transaction::Rfc5389(RFC_TXID));
        assert_eq!(sample.unknown, vec![0x0024]);
        // The list is capped.
        let types: Vec<u16> = (0x7000..0x7040).collect();
        let many: Vec<(u16, &[u8])> = types.iter().map(|t| (*t, &b""[..])).collect();
        let parsed = parse_binding_request(&request_with(&many)).expect("parses");
        assert_eq!(parsed.unknown, types[..MAX_UNKNOWN_ATTRIBUTES].to_vec());
        // A CHANGE-REQUEST shorter than its 4 bytes is malformed.
        assert_eq!(
            parse_binding_request(&request_with(&[(ATTR_CHANGE_REQUEST, &[0, 0])])),
            Err(StunError::MalformedAttribute { offset: 20 })
        );
        // So is a bad fingerprint, in a modern request.
        let mut fp = Vec::new();
        build_request([1; 12], None, &mut fp);
        let last = fp.len() - 1;
        fp[last] ^= 1;
        assert!(matches!(
            parse_binding_request(&fp),
            Err(StunError::BadFingerprint { .. })
        ));
    }

    #[test]
    fn error_420_lists_the_unknown_attributes() {
        let mut out = Vec::new();
        build_unknown_attributes_error(Transaction::Rfc5389([2; 12]), &[0x7777], &mut out);
        let mut expected = hex("01 11 00 24 21 12 a4 42");
        expected.extend_from_slice(&[2; 12]);
        expected.extend_from_slice(&hex("00 09 00 15 00 00 04 14"));
        expected.extend_from_slice(b"Unknown Attribute\0\0\0");
        // One type, padded by repeating it.
        expected.extend_from_slice(&hex("00 0a 00 02 77 77 77 77"));
        assert_eq!(out, expected);
        assert_eq!(
            parse_error_response(&out),
            Ok((Transaction::Rfc5389([2; 12]), 420, vec![0x7777]))
        );
        // Classic form, two types.
        let mut classic = Vec::new();
        let id = [9u8; 16];
        build_unknown_attributes_error(
            Transaction::Rfc3489(id),
            &[ATTR_CHANGE_REQUEST, 0x0002],
            &mut classic,
        );
        assert_eq!(&classic[..4], &[0x01, 0x11, 0x00, 0x24]);
        assert_eq!(&classic[4..20], &id);
        assert_eq!(
            parse_error_response(&classic),
            Ok((
                Transaction::Rfc3489(id),
                420,
                vec![ATTR_CHANGE_REQUEST, 0x0002]
            ))
        );
        assert_eq!(
            parse_error_response(&hex(RFC_RESPONSE_V4)),
            Err(StunError::NotErrorResponse {
                message_type: 0x0101
            })
        );
    }

    #[test]
    fn demux_rule() {
        let mut req = Vec::new();
        build_request([0; 12], None, &mut req);
        assert!(is_stun(&req));
        assert!(!is_stun(&req[..19]));
        let mut wg = vec![1, 0, 0, 0];
        wg.extend_from_slice(&[0; 144]);
        assert!(!is_stun(&wg));
        let mut top_bits = req.clone();
        top_bits[0] = 0x40;
        assert!(!is_stun(&top_bits));
        assert!(!is_stun(b"TS\xf0\x9f\x92\xac and more bytes here"));
    }
}
