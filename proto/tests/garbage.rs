//! Every parser of untrusted bytes in warren-proto, fed random bytes and mutations of valid
//! encodings: each must return (a value or a typed error) and never panic. A seeded generator
//! keeps runs identical; this is the stable-toolchain stand-in for a coverage-guided fuzzer.

use warren_proto::derp::{self, Frame};
use warren_proto::disco::{self, Message};
use warren_proto::{DiscoSecretKey, NodePublicKey, NodeSecretKey, stun};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % (max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut v = valid.to_vec();
        match self.next() % 4 {
            0 if !v.is_empty() => {
                let i = (self.next() as usize) % v.len();
                v[i] ^= 1 << (self.next() % 8);
            }
            1 => v.truncate((self.next() as usize) % (v.len() + 1)),
            2 => v.extend(self.bytes(64)),
            _ if !v.is_empty() => {
                let i = (self.next() as usize) % v.len();
                v[i] = self.next() as u8;
            }
            _ => {}
        }
        v
    }
}

fn valid_frames() -> Vec<Vec<u8>> {
    let key = NodePublicKey::from_bytes([7; 32]);
    let frames = [
        Frame::SendPacket {
            dst: key,
            packet: vec![1, 2, 3],
        },
        Frame::RecvPacket {
            src: key,
            packet: vec![0; 100],
        },
        Frame::KeepAlive,
        Frame::NotePreferred { preferred: true },
        Frame::Ping { data: [1; 8] },
        Frame::Health {
            problem: "x".into(),
        },
        Frame::Restarting {
            reconnect_in_ms: 1,
            try_for_ms: 2,
        },
    ];
    frames
        .iter()
        .map(|f| {
            let mut out = Vec::new();
            f.encode(&mut out);
            out
        })
        .collect()
}

#[test]
fn derp_frames_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let valid = valid_frames();
    for i in 0..50_000 {
        let input = if i % 2 == 0 {
            rng.bytes(300)
        } else {
            rng.mutate(&valid[i % valid.len()])
        };
        if let Ok(Some((frame, used))) = Frame::decode(&input) {
            assert!(used <= input.len());
            let mut again = Vec::new();
            frame.encode(&mut again);
            assert_eq!(again.len(), frame.encoded_len());
        }
    }
}

#[test]
fn stun_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut req = Vec::new();
    stun::build_request([3; 12], Some(stun::SOFTWARE_TAILNODE), &mut req);
    let mut resp = Vec::new();
    stun::build_response([3; 12], "192.0.2.1:32853".parse().expect("addr"), &mut resp);
    let mut classic = vec![0, 1, 0, 8];
    classic.extend_from_slice(&[7; 16]);
    classic.extend_from_slice(&[0, 3, 0, 4, 0, 0, 0, 6]);
    let mut error = Vec::new();
    stun::build_unknown_attributes_error(
        stun::Transaction::Rfc3489([7; 16]),
        &[0x7777, 3],
        &mut error,
    );
    for i in 0..50_000 {
        let input = match i % 5 {
            0 => rng.bytes(200),
            1 => rng.mutate(&req),
            2 => rng.mutate(&classic),
            3 => rng.mutate(&error),
            _ => rng.mutate(&resp),
        };
        let _ = stun::is_stun(&input);
        let _ = stun::parse_request(&input);
        let _ = stun::parse_response(&input);
        if let Ok(r) = stun::parse_binding_request(&input) {
            assert!(r.unknown.len() <= stun::MAX_UNKNOWN_ATTRIBUTES);
            let mut out = Vec::new();
            stun::build_unknown_attributes_error(r.transaction, &r.unknown, &mut out);
            assert_eq!(
                stun::parse_error_response(&out),
                Ok((r.transaction, stun::ERROR_UNKNOWN_ATTRIBUTE, r.unknown))
            );
        }
        let _ = stun::parse_error_response(&input);
        let _ = stun::parse_classic_response(&input);
    }
}

#[test]
fn disco_never_panics() {
    let mut rng = Rng(0x0f0f_0f0f_1234_4321);
    let me = DiscoSecretKey::generate();
    let peer = DiscoSecretKey::generate();
    let msgs = [
        Message::Ping {
            tx_id: [1; 12],
            node_key: Some(NodeSecretKey::generate().public_key()),
            padding: 3,
        },
        Message::Pong {
            tx_id: [2; 12],
            src: "[2001:db8::1]:41641".parse().expect("addr"),
        },
        Message::CallMeMaybe {
            endpoints: vec!["192.0.2.1:1".parse().expect("addr")],
        },
    ];
    let sealed: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| disco::seal(&peer, &me.public_key(), [5; 24], m))
        .collect();
    let plain: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| {
            let mut out = Vec::new();
            m.encode(&mut out);
            out
        })
        .collect();
    for i in 0..30_000 {
        let packet = if i % 2 == 0 {
            rng.bytes(200)
        } else {
            rng.mutate(&sealed[i % sealed.len()])
        };
        let _ = disco::looks_like_disco(&packet);
        let _ = disco::sender_key(&packet);
        let _ = disco::open(&me, &packet);
        let _ = Message::decode(&rng.mutate(&plain[i % plain.len()]));
    }
}

#[test]
fn derp_info_boxes_never_panic() {
    let server = warren_proto::DerpSecretKey::generate();
    let client = NodeSecretKey::generate();
    let info = derp::ClientInfo {
        version: 2,
        ..Default::default()
    };
    let frame = derp::seal_client_info(&client, &server.public_key(), [9; 24], &info);
    let mut valid = Vec::new();
    frame.encode(&mut valid);
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for _ in 0..20_000 {
        let input = rng.mutate(&valid);
        if let Ok(Some((f, _))) = Frame::decode(&input) {
            let _ = derp::open_client_info(&server, &f);
        }
    }
}
