//! Lets standard gRPC clients in over the Unix socket: an `:authority` that is not a URI
//! authority is replaced before the HTTP/2 server sees it.
//!
//! grpcio (since 1.57) sends a `unix:` target's socket path, percent-encoded, as `:authority`
//! (`%2Frun%2Flambda-imaged%2Flambda-imaged.sock`); grpc-java sends the raw path. h2, under
//! hyper and tonic, parses `:authority` as a URI authority and answers anything else with
//! RST_STREAM PROTOCOL_ERROR (`h2::server::Peer::convert_poll_message`; there is no setting,
//! and hyperium/h2 PR #487 to allow it is unmerged). Over a Unix socket the authority names
//! nothing (the socket is the address), so [`TolerantAuthority`] wraps each accepted
//! connection and rewrites such a value to [`SUBSTITUTE_AUTHORITY`], what grpc-go and grpc-js
//! send.
//!
//! HPACK is stateful, so the rewrite cannot patch bytes in place: every client header block
//! (HEADERS plus its CONTINUATIONs) is decoded with the client's dynamic table
//! (`loona-hpack`) and re-encoded as literals without indexing, which leaves the server's
//! dynamic table empty and so always in step. All other frames, and everything the server
//! writes, pass through untouched. A valid authority (ours: `lambda-imaged.local`, grpc-js's
//! `localhost`) is kept as sent.
//!
//! Decoding every block costs more than the rest of a cached answer (the HPACK decoder builds
//! its Huffman table for each string), so a connection pays only while it must: blocks that
//! need no rewrite pass unchanged (the server's dynamic table then follows the client's, as
//! without us) until the first one that does, and from then on every block is re-encoded.
//! Once a block with a valid `:authority` has passed unchanged, the connection is passed
//! through without looking: a client names its authority once per connection (it is the
//! channel's target in gRPC), so a connection that starts well needs no rewrite later.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;
use tonic::transport::server::Connected;

/// What replaces an `:authority` that is not a URI authority (grpc-go's and grpc-js's choice
/// for Unix sockets).
pub const SUBSTITUTE_AUTHORITY: &str = "localhost";
/// The client connection preface (RFC 9113 §3.4), passed through as is.
const PREFACE_LEN: usize = 24;
/// Frame header size (RFC 9113 §4.1).
const FRAME_HEAD_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload we emit: the protocol's minimum SETTINGS_MAX_FRAME_SIZE, which every
/// server accepts (RFC 9113 §4.2).
const MAX_EMITTED_PAYLOAD: usize = 16_384;
/// The client's HPACK table may not outgrow what the server announced: h2's default
/// SETTINGS_HEADER_TABLE_SIZE (tonic does not change it).
const HPACK_TABLE_SIZE: usize = 4_096;
/// Limit on one header block as received and as decoded (RFC 7541 §4.1 sizes), far above
/// hyper's 16 KiB header list limit, which still applies after us; a block over it closes the
/// connection (an HPACK bomb would otherwise decode to gigabytes).
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 16 * 1024;

/// An accepted connection whose client header blocks get a valid `:authority` (see the module
/// docs). Reads yield the rewritten byte stream; writes go straight to the socket. A malformed
/// frame or header block is a read error, which closes the connection.
pub struct TolerantAuthority<S> {
    inner: S,
    /// Read from the socket, not processed yet.
    input: BytesMut,
    /// Processed, for the HTTP/2 server to read.
    output: BytesMut,
    state: State,
    /// A header block was re-encoded: every later one must be (the server's dynamic table no
    /// longer follows the client's).
    rewriting: bool,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<HeaderBlock>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

enum State {
    /// Inside the connection preface; this many bytes of it left.
    Preface(usize),
    /// At a frame boundary.
    FrameHead,
    /// Inside a frame passed through; this many payload bytes left.
    PassThrough(usize),
    /// Everything from here on passes through unread (see the module docs).
    Transparent,
}

/// A HEADERS frame's block, gathered until END_HEADERS.
struct HeaderBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The block's frames as received (heads, padding and all), to pass on unchanged.
    frames: Vec<u8>,
}

impl<S> TolerantAuthority<S> {
    /// Wraps a freshly accepted connection (before any byte was read from it).
    pub fn new(inner: S) -> TolerantAuthority<S> {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        TolerantAuthority {
            inner,
            input: BytesMut::new(),
            output: BytesMut::new(),
            state: State::Preface(PREFACE_LEN),
            rewriting: false,
            pending: None,
            decoder,
            eof: false,
        }
    }

    /// Moves what it can from `input` to `output`; true if anything changed.
    fn advance(&mut self) -> io::Result<bool> {
        let (left, preface) = match self.state {
            State::FrameHead => return self.frame(),
            State::Transparent if self.input.is_empty() => return Ok(false),
            State::Transparent => {
                self.output.unsplit(self.input.split());
                return Ok(true);
            }
            State::Preface(left) => (left, true),
            State::PassThrough(left) => (left, false),
        };
        let n = left.min(self.input.len());
        if left > 0 && n == 0 {
            return Ok(false);
        }
        self.output.extend_from_slice(&self.input.split_to(n));
        self.state = match left - n {
            0 => State::FrameHead,
            rest if preface => State::Preface(rest),
            rest => State::PassThrough(rest),
        };
        Ok(true)
    }

    /// At a frame boundary: passes a frame's head through, or takes a whole header frame.
    fn frame(&mut self) -> io::Result<bool> {
        let Some(head) = self.input.get(..FRAME_HEAD_LEN) else {
            return Ok(false);
        };
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let in_block = self.pending.is_some();
        if in_block && kind != CONTINUATION {
            return Err(invalid(
                "a header block was interrupted by another frame (RFC 9113 §6.10)",
            ));
        }
        if kind != HEADERS && kind != CONTINUATION || kind == CONTINUATION && !in_block {
            // Not ours to read (a stray CONTINUATION is left for h2 to refuse).
            self.output
                .extend_from_slice(&self.input.split_to(FRAME_HEAD_LEN));
            self.state = State::PassThrough(len);
            return Ok(true);
        }
        let gathered = self.pending.as_ref().map_or(0, |p| p.fragment.len());
        if gathered + len > MAX_HEADER_BLOCK {
            return Err(invalid("a header block is over 1 MiB"));
        }
        if self.input.len() < FRAME_HEAD_LEN + len {
            self.input.reserve(FRAME_HEAD_LEN + len - self.input.len());
            return Ok(false);
        }
        let frame = self.input.split_to(FRAME_HEAD_LEN + len);
        let payload = &frame[FRAME_HEAD_LEN..];
        match self.pending.as_mut() {
            None => self.pending = Some(HeaderBlock::from_headers(stream, flags, payload)?),
            Some(block) if block.stream == stream => block.fragment.extend_from_slice(payload),
            Some(_) => {
                return Err(invalid("CONTINUATION on another stream (RFC 9113 §6.10)"));
            }
        }
        if let Some(block) = self.pending.as_mut() {
            block.frames.extend_from_slice(&frame);
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.pending.take()
        {
            self.emit(block)?;
        }
        Ok(true)
    }

    /// Decodes a complete header block and writes it out: unchanged while no block needed a
    /// rewrite, else re-encoded, as HEADERS and CONTINUATION frames of at most
    /// [`MAX_EMITTED_PAYLOAD`]. An unchanged block with a valid `:authority` makes the rest of
    /// the connection transparent.
    fn emit(&mut self, block: HeaderBlock) -> io::Result<()> {
        let mut fields = Vec::new();
        let mut decoded_size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                // RFC 7541 §4.1: an entry's size is its name and value plus 32.
                decoded_size += name.len() + value.len() + 32;
                if decoded_size <= MAX_HEADER_BLOCK {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|err| invalid(&format!("undecodable header block: {err:?}")))?;
        if decoded_size > MAX_HEADER_BLOCK {
            return Err(invalid("a header block decodes to over 1 MiB"));
        }
        let refused = |name: &[u8], value: &[u8]| {
            name == b":authority" && http::uri::Authority::try_from(value).is_err()
        };
        if !self.rewriting && !fields.iter().any(|(name, value)| refused(name, value)) {
            self.output.extend_from_slice(&block.frames);
            if fields.iter().any(|(name, _)| name == b":authority") {
                self.state = State::Transparent;
            }
            return Ok(());
        }
        self.rewriting = true;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &fields {
            let value = if refused(name, value) {
                SUBSTITUTE_AUTHORITY.as_bytes()
            } else {
                &value[..]
            };
            // Literal header field without indexing, new name (RFC 7541 §6.2.2), raw strings.
            encoded.push(0x00);
            for text in [&name[..], value] {
                loona_hpack::encoder::encode_integer_into(text.len(), 7, 0, &mut encoded)?;
                encoded.extend_from_slice(text);
            }
        }

        let priority_len = block.priority.map_or(0, |p| p.len());
        let (first, mut rest) =
            encoded.split_at(encoded.len().min(MAX_EMITTED_PAYLOAD - priority_len));
        let mut flags = block.flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame_head(priority_len + first.len(), HEADERS, flags, block.stream);
        if let Some(priority) = block.priority {
            self.output.extend_from_slice(&priority);
        }
        self.output.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, left) = rest.split_at(rest.len().min(MAX_EMITTED_PAYLOAD));
            let flags = if left.is_empty() { END_HEADERS } else { 0 };
            self.frame_head(chunk.len(), CONTINUATION, flags, block.stream);
            self.output.extend_from_slice(chunk);
            rest = left;
        }
        Ok(())
    }

    /// Appends a frame header; `len` ≤ [`MAX_EMITTED_PAYLOAD`], so it fits the 24-bit field.
    fn frame_head(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        self.output.put_uint(len as u64, 3);
        self.output.put_u8(kind);
        self.output.put_u8(flags);
        self.output.put_u32(stream);
    }
}

impl HeaderBlock {
    /// The block fragment of a HEADERS frame, its padding dropped and its priority kept.
    fn from_headers(stream: u32, flags: u8, mut payload: &[u8]) -> io::Result<HeaderBlock> {
        let mut padding = 0;
        if flags & PADDED != 0 {
            if payload.is_empty() {
                return Err(invalid("a padded HEADERS frame is empty"));
            }
            padding = usize::from(payload.get_u8());
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let mut bytes = [0u8; 5];
            if payload.len() < bytes.len() {
                return Err(invalid("a HEADERS frame's priority is cut short"));
            }
            payload.copy_to_slice(&mut bytes);
            priority = Some(bytes);
        }
        if padding > payload.len() {
            return Err(invalid(
                "a HEADERS frame's padding is longer than the frame",
            ));
        }
        Ok(HeaderBlock {
            stream,
            flags,
            priority,
            fragment: payload[..payload.len() - padding].to_vec(),
            frames: Vec::new(),
        })
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {what}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for TolerantAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.advance()? {
                continue;
            }
            if this.eof {
                // An incomplete frame left in `input` is dropped: h2 sees the connection end.
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, State::Transparent) {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Into `input`'s spare room, which is not zeroed first (a zeroed 16 KiB buffer
            // per read cost as much as the rest of a small frame's handling).
            this.input.reserve(READ_CHUNK);
            match poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.input) {
                Poll::Ready(Ok(read)) => this.eof = read == 0,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TolerantAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The peer's credentials stay those of the socket (the service's access check needs them).
impl<S: Connected> Connected for TolerantAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0x0;
    const SETTINGS: u8 = 0x4;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// (kind, flags, stream, payload) of each frame after the preface.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    /// What the server side reads when a client sends `input`.
    async fn through(input: &[u8]) -> Vec<u8> {
        let mut output = Vec::new();
        TolerantAuthority::new(input)
            .read_to_end(&mut output)
            .await
            .unwrap();
        output
    }

    /// The preface, an empty SETTINGS, and `block` on stream 1: a HEADERS frame with a
    /// priority and `padding` bytes of padding holding its first half, a CONTINUATION the rest.
    fn preface_and_split_block(block: &[u8], padding: u8) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        input.extend(frame(SETTINGS, 0, 0, &[]));
        let (head, tail) = block.split_at(block.len() / 2);
        let mut padded = vec![padding];
        padded.extend([0x80, 0, 0, 1, 15]);
        padded.extend(head);
        padded.extend(std::iter::repeat_n(0, usize::from(padding)));
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, tail));
        input
    }

    fn request<'a>(authority: &'a [u8], extra: &'a [u8]) -> Vec<(&'a [u8], &'a [u8])> {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/grpc.health.v1.Health/Check"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"x-extra", extra),
        ]
    }

    /// Two requests from a client whose encoder indexes (the second refers to the first's
    /// dynamic table entries), the first padded, with a priority and split over CONTINUATION,
    /// the second with a field too big for one frame: the server side reads both with
    /// `localhost` as authority and every other field and frame unchanged.
    #[tokio::test]
    async fn path_authorities_become_localhost_and_the_rest_is_kept() {
        let path_authority = b"%2Ftmp%2Flambda-imaged%2Fd.sock";
        let big = vec![b'x'; 40_000];
        let mut encoder = loona_hpack::Encoder::new();
        let first = encoder.encode(request(path_authority, b"one"));
        let second = encoder.encode(request(path_authority, &big));
        let third = encoder.encode(request(b"lambda-imaged.local", b"three"));
        assert!(
            second.len() < 200 + big.len(),
            "the second block reuses indexed fields"
        );

        let mut input = preface_and_split_block(&first, 3);
        input.extend(frame(DATA, END_STREAM, 1, b"\0\0\0\0\0"));
        let (head, tail) = second.split_at(second.len() - 100);
        input.extend(frame(HEADERS, END_STREAM, 3, head));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, tail));
        input.extend(frame(HEADERS, END_STREAM | END_HEADERS, 5, &third));

        let output = through(&input).await;
        assert_eq!(&output[..PREFACE.len()], PREFACE);
        let frames = frames(&output[PREFACE.len()..]);
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks: Vec<(u32, u8, Vec<u8>)> = Vec::new();
        let mut others = Vec::new();
        for (kind, flags, stream, payload) in frames {
            assert!(
                payload.len() <= MAX_EMITTED_PAYLOAD,
                "frame of {}",
                payload.len()
            );
            match kind {
                HEADERS => blocks.push((stream, flags, payload)),
                CONTINUATION => {
                    let last = blocks.last_mut().unwrap();
                    assert_eq!(last.0, stream);
                    last.1 |= flags & END_HEADERS;
                    last.2.extend(payload);
                }
                _ => others.push((kind, flags, stream, payload)),
            }
        }
        assert_eq!(
            others,
            vec![
                (SETTINGS, 0, 0, vec![]),
                (DATA, END_STREAM, 1, b"\0\0\0\0\0".to_vec())
            ]
        );
        assert_eq!(blocks.len(), 3);
        let decoded: Vec<_> = blocks
            .iter()
            .map(|(_, flags, payload)| {
                assert!(flags & END_HEADERS != 0);
                let block = if flags & PRIORITY != 0 {
                    assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 15], "priority kept");
                    &payload[5..]
                } else {
                    &payload[..]
                };
                decoder.decode(block).unwrap()
            })
            .collect();
        assert_eq!(blocks[0].1 & (END_STREAM | PRIORITY), PRIORITY);
        assert_eq!(blocks[1].1 & END_STREAM, END_STREAM);
        let owned = |fields: Vec<(&[u8], &[u8])>| {
            fields
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(decoded[0], owned(request(b"localhost", b"one")));
        assert_eq!(decoded[1], owned(request(b"localhost", &big)));
        assert_eq!(decoded[2], owned(request(b"lambda-imaged.local", b"three")));
    }

    /// Every HEADERS block of `bytes` (after the preface), its CONTINUATIONs joined, decoded in
    /// order with one decoder, as the server side would.
    fn decoded_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        for (kind, flags, _, payload) in frames(&bytes[PREFACE.len()..]) {
            match kind {
                HEADERS => {
                    let padding = if flags & PADDED != 0 {
                        payload[0] as usize
                    } else {
                        0
                    };
                    let start =
                        usize::from(flags & PADDED != 0) + 5 * usize::from(flags & PRIORITY != 0);
                    blocks.push(payload[start..payload.len() - padding].to_vec());
                }
                CONTINUATION => blocks.last_mut().unwrap().extend(payload),
                _ => {}
            }
        }
        blocks
            .iter()
            .map(|block| decoder.decode(block).unwrap())
            .collect()
    }

    fn owned(fields: Vec<(&[u8], &[u8])>) -> Vec<(Vec<u8>, Vec<u8>)> {
        fields
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect()
    }

    /// A client whose first block names a valid authority is passed through byte for byte
    /// (padding, priority and CONTINUATION split kept), later blocks that refer to its dynamic
    /// table entries included.
    #[tokio::test]
    async fn a_connection_that_starts_with_a_valid_authority_passes_unchanged() {
        let mut encoder = loona_hpack::Encoder::new();
        let first = encoder.encode(request(b"lambda-imaged.local", b"one"));
        let second = encoder.encode(request(b"lambda-imaged.local", b"two"));
        let mut input = preface_and_split_block(&first, 2);
        input.extend(frame(DATA, END_STREAM, 1, b"\0\0\0\0\0"));
        input.extend(frame(HEADERS, END_STREAM | END_HEADERS, 3, &second));
        let output = through(&input).await;
        assert_eq!(output, input);
    }

    /// Blocks that need no rewrite pass unchanged until one does; from then on every block is
    /// re-encoded, and the server side still decodes each one as the client meant it (its
    /// dynamic table, fed only the unchanged blocks, is never referred to again).
    #[tokio::test]
    async fn a_rewrite_after_unchanged_blocks_keeps_the_tables_in_step() {
        let path_authority = b"%2Ftmp%2Flambda-imaged%2Fd.sock";
        let mut encoder = loona_hpack::Encoder::new();
        let no_authority: Vec<(&[u8], &[u8])> = vec![(b":method", b"POST"), (b"x-extra", b"zero")];
        let blocks = [
            encoder.encode(no_authority.clone()),
            encoder.encode(request(path_authority, b"one")),
            encoder.encode(request(b"lambda-imaged.local", b"two")),
        ];
        let mut input = PREFACE.to_vec();
        for (index, block) in blocks.iter().enumerate() {
            let stream = 2 * index as u32 + 1;
            input.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, block));
        }
        let output = through(&input).await;
        let first_len = PREFACE.len() + FRAME_HEAD_LEN + blocks[0].len();
        assert_eq!(
            output[..first_len],
            input[..first_len],
            "the first block unchanged"
        );
        assert_eq!(
            decoded_blocks(&output),
            vec![
                owned(no_authority),
                owned(request(b"localhost", b"one")),
                owned(request(b"lambda-imaged.local", b"two")),
            ]
        );
    }

    /// A block that decodes to more than the limit (an HPACK bomb: one indexed field repeated)
    /// closes the connection instead of growing memory.
    #[tokio::test]
    async fn a_header_bomb_is_refused() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut block = encoder.encode([(&b"x-big"[..], &vec![b'y'; 4000][..])]);
        // Indexed field 62 (the entry just added), repeated: ~4 KB decoded per byte.
        block.extend(std::iter::repeat_n(0x80 | 62, 400));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let mut output = Vec::new();
        let err = TolerantAuthority::new(&input[..])
            .read_to_end(&mut output)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over 1 MiB"), "{err}");
    }
}
