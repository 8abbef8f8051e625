//! The gRPC codec of warren's services: prost messages, with encode buffers kept small.
//!
//! tonic encodes a stream's messages into one buffer that keeps, for the stream's whole life,
//! the capacity of the most it ever held at once, and by default it packs messages into that
//! buffer until 32 KiB are waiting. With ten thousand map streams open that is hundreds of
//! megabytes held for nothing. Here every message is handed on as soon as it is encoded, so a
//! stream's buffer stays the size of its largest message; control keeps those small by sending
//! full maps in pages.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec as TonicCodec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Capacity a stream's encode and decode buffers start with (tonic's default).
pub const BUFFER_SIZE: usize = 8 * 1024;

/// The prost codec with one message per buffer hand-off (used by the generated services).
#[derive(Debug)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        // A yield threshold of 1: every encoded message leaves the buffer at once.
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, 1))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, 1))
    }
}
