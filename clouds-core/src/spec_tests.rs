//! Pins the worked examples of `docs/protocol.md` §12 to the codec.
//!
//! Every frame in §12 is a fenced block tagged `hex <name>`. For each one, this module knows
//! the frame it describes and checks that:
//!
//! - encoding that frame with the real encoder gives exactly the bytes of the block;
//! - decoding the bytes gives that frame (and its body decodes to the described value);
//! - a reply example is what the real route produces for the call it answers;
//! - a `| Bytes | Meaning |` table right under a block lists the same bytes, in order;
//! - a size quoted as `(N bytes)` on the line that introduces a block, or as
//!   `<frame NAME: N bytes>` anywhere in §12, is the block's length.
//!
//! §12 must hold exactly the examples this module knows, and no untagged block of hex bytes,
//! so that an example added, changed or removed there, or a codec that drifts, fails here.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};

use crate::codec::{self, ReplyBody};
use crate::codegen::{result_route, value_route};
use crate::envelope::{Call, Frame, Reply, Status, WireStr};
use crate::node_id::NodeId;
use crate::service::Route;

const SPEC: &str = include_str!("../../docs/protocol.md");

/// The error type of the §12.2 example, as the spec advises: an enum.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum DivError {
    DivisionByZero,
}

/// The same error as a unit struct, the form the spec advises against.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct UnitDivError;

// ---------------------------------------------------------------------------------------------
// Reading §12

/// One `hex <name>` block of §12.
#[derive(Debug)]
struct Example {
    name: String,
    bytes: Vec<u8>,
    /// The bytes listed by the `| Bytes | Meaning |` table right under the block, if any.
    breakdown: Option<Vec<u8>>,
    /// `N` of a `(N bytes)` on the line introducing the block, if any.
    quoted_len: Option<usize>,
}

/// The text of §12, from its heading to the next `## ` heading (or the end).
fn section_12() -> &'static str {
    let start = SPEC
        .find("\n## 12.")
        .expect("docs/protocol.md has a section 12 (\"## 12. ...\")");
    let rest = &SPEC[start + 1..];
    match rest[3..].find("\n## ") {
        Some(end) => &rest[..end + 4],
        None => rest,
    }
}

/// Bytes written as two-digit hex numbers separated by white space; `None` if `text` is not
/// (only) that.
fn hex(text: &str) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for token in text.split_whitespace() {
        if token.len() != 2 {
            return None;
        }
        bytes.push(u8::from_str_radix(token, 16).ok()?);
    }
    (!bytes.is_empty()).then_some(bytes)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `N` of the first `(N bytes)` in `line`.
fn quoted_len(line: &str) -> Option<usize> {
    let end = line.find(" bytes)")?;
    let start = line[..end].rfind('(')? + 1;
    line[start..end].trim().parse().ok()
}

/// The bytes listed in the first column of a `| Bytes | Meaning |` table: every backquoted
/// piece of it, in order.
fn table_bytes(rows: &[&str]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for row in rows {
        let cell = row.trim().trim_start_matches('|');
        let cell = &cell[..cell.find('|').unwrap_or(cell.len())];
        for (i, piece) in cell.split('`').enumerate() {
            if i % 2 == 1 {
                bytes.extend(
                    hex(piece).unwrap_or_else(|| panic!("not hex bytes in table row: {row}")),
                );
            }
        }
    }
    bytes
}

/// A fenced block of §12.
struct Block {
    /// What follows the opening ```.
    info: String,
    contents: String,
    /// Index of the opening line.
    open: usize,
    /// Index of the line after the closing ```.
    after: usize,
}

/// The lines of §12 and its fenced blocks.
fn fenced_blocks(section: &str) -> (Vec<&str>, Vec<Block>) {
    let lines: Vec<&str> = section.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let open = i;
        let mut body = String::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            body.push_str(lines[i]);
            body.push('\n');
            i += 1;
        }
        assert!(
            i < lines.len(),
            "unclosed code block in §12: {}",
            lines[open]
        );
        blocks.push(Block {
            info: info.trim().to_string(),
            contents: body,
            open,
            after: i + 1,
        });
        i += 1;
    }
    (lines, blocks)
}

/// The `hex <name>` blocks of §12.
fn examples() -> Vec<Example> {
    let (lines, blocks) = fenced_blocks(section_12());
    let mut examples = Vec::new();
    for Block {
        info,
        contents: body,
        open,
        after,
    } in blocks
    {
        let Some(name) = info.strip_prefix("hex ") else {
            assert!(
                hex(&body).is_none(),
                "§12 has hex bytes in a block not tagged `hex <name>`, which nothing checks:\n{body}"
            );
            continue;
        };
        let bytes = hex(&body)
            .unwrap_or_else(|| panic!("block `hex {name}` holds something other than hex bytes"));
        let introduction = lines[..open].iter().rev().find(|l| !l.trim().is_empty());
        let mut next = after;
        while next < lines.len() && lines[next].trim().is_empty() {
            next += 1;
        }
        let breakdown = lines
            .get(next)
            .filter(|line| line.trim_start().starts_with("| Bytes |"))
            .map(|_| {
                let rows: Vec<&str> = lines[next + 2..]
                    .iter()
                    .take_while(|line| line.trim_start().starts_with('|'))
                    .copied()
                    .collect();
                table_bytes(&rows)
            });
        examples.push(Example {
            name: name.trim().to_string(),
            bytes,
            breakdown,
            quoted_len: introduction.and_then(|line| quoted_len(line)),
        });
    }
    examples
}

// ---------------------------------------------------------------------------------------------
// What each example is

fn wire(s: &'static str) -> WireStr {
    WireStr::new(Bytes::from_static(s.as_bytes())).expect("UTF-8")
}

fn value<T: Serialize + ?Sized>(v: &T) -> Bytes {
    Bytes::from(codec::encode_value(v).expect("encodable"))
}

fn args<A: Serialize + ?Sized>(a: &A) -> Bytes {
    Bytes::from(codec::encode_args(a).expect("a tuple"))
}

/// A reply as the server makes it from a handler's outcome.
fn reply_frame<T: Serialize + ?Sized>(id: u64, status: Status, body: &T) -> Vec<u8> {
    ReplyBody::encode(body)
        .expect("encodable")
        .into_frame(id, status)
        .to_vec()
}

/// `test.hello` as the README's `Greeter` implements it (generated routes use `value_route`).
fn hello_route() -> Route {
    value_route("test.hello", |(name, msg): (String, String)| async move {
        format!("Hello {name}, {msg}")
    })
}

/// `test.div` with the typed error of §12.2 (generated routes use `result_route`).
fn div_route() -> Route {
    result_route("test.div", |(a, b): (i64, i64)| async move {
        if b == 0 {
            Err(DivError::DivisionByZero)
        } else {
            Ok(a / b)
        }
    })
}

/// `test.div` with a unit-struct error.
fn div_unit_route() -> Route {
    result_route("test.div", |(a, b): (i64, i64)| async move {
        if b == 0 { Err(UnitDivError) } else { Ok(a / b) }
    })
}

/// `test.div` registered by name (`Server::register`): its error travels as its text.
fn div_dynamic_route() -> Route {
    Route::new("test.div", |(a, b): (i64, i64)| async move {
        if b == 0 {
            Err("division by zero")
        } else {
            Ok(a / b)
        }
    })
}

/// A reply example's route, and the name of the call example it answers.
type Answers = (fn() -> Route, &'static str);

/// One example: the frame's bytes as the encoder writes them, the frame the decoder must
/// give, and what else to check about it.
struct Case {
    encoded: Vec<u8>,
    frame: Frame,
    /// Checks the decoded frame's body as the receiver would decode it.
    check_body: fn(&Frame),
    /// For a reply: the route that answers, and the example of the call it answers.
    answers: Option<Answers>,
}

fn case(name: &str) -> Option<Case> {
    Some(match name {
        "call-hello" => Case {
            encoded: codec::encode_call(7, "test.hello", "client-a", 2000, &("Glen", "hi"))
                .expect("encodable"),
            frame: Frame::Call(Call {
                id: 7,
                method: wire("test.hello"),
                reply_to: wire("client-a"),
                deadline_ms: 2000,
                args: args(&("Glen", "hi")),
                trace: None,
            }),
            check_body: |frame| {
                let Frame::Call(call) = frame else {
                    panic!("not a call")
                };
                let decoded = codec::decode_args::<(String, String)>(&call.args);
                assert_eq!(decoded, Ok(("Glen".to_string(), "hi".to_string())));
            },
            answers: None,
        },
        "reply-hello" => Case {
            encoded: reply_frame(7, Status::Ok, "Hello Glen, hi"),
            frame: Frame::Reply(Reply {
                id: 7,
                status: Status::Ok,
                body: value("Hello Glen, hi"),
                claim: None,
            }),
            check_body: |frame| {
                let Frame::Reply(reply) = frame else {
                    panic!("not a reply")
                };
                let decoded = codec::decode_value::<String>(&reply.body);
                assert_eq!(decoded.as_deref(), Ok("Hello Glen, hi"));
            },
            answers: Some((hello_route, "call-hello")),
        },
        "call-div" => Case {
            encoded: codec::encode_call(8, "test.div", "client-a", 2000, &(7i64, 0i64))
                .expect("encodable"),
            frame: Frame::Call(Call {
                id: 8,
                method: wire("test.div"),
                reply_to: wire("client-a"),
                deadline_ms: 2000,
                args: args(&(7i64, 0i64)),
                trace: None,
            }),
            check_body: |frame| {
                let Frame::Call(call) = frame else {
                    panic!("not a call")
                };
                assert_eq!(codec::decode_args::<(i64, i64)>(&call.args), Ok((7, 0)));
            },
            answers: None,
        },
        "reply-div-error" => Case {
            encoded: reply_frame(8, Status::AppError, &DivError::DivisionByZero),
            frame: Frame::Reply(Reply {
                id: 8,
                status: Status::AppError,
                body: value("DivisionByZero"),
                claim: None,
            }),
            check_body: |frame| {
                let Frame::Reply(reply) = frame else {
                    panic!("not a reply")
                };
                let decoded = codec::decode_value::<DivError>(&reply.body);
                assert_eq!(decoded, Ok(DivError::DivisionByZero));
            },
            answers: Some((div_route, "call-div")),
        },
        "reply-div-unit-struct" => Case {
            encoded: reply_frame(8, Status::AppError, &UnitDivError),
            frame: Frame::Reply(Reply {
                id: 8,
                status: Status::AppError,
                body: Bytes::from_static(&[0x90]),
                claim: None,
            }),
            check_body: |frame| {
                let Frame::Reply(reply) = frame else {
                    panic!("not a reply")
                };
                assert_eq!(
                    codec::decode_value::<UnitDivError>(&reply.body),
                    Ok(UnitDivError)
                );
                // The point of the advice: the same bytes are also an empty list, an empty
                // tuple struct, ... Nothing in them names the error.
                assert_eq!(value(&Vec::<u8>::new()), reply.body);
                assert_eq!(
                    codec::decode_value::<Vec<String>>(&reply.body),
                    Ok(Vec::new())
                );
            },
            answers: Some((div_unit_route, "call-div")),
        },
        "reply-div-dynamic" => Case {
            encoded: reply_frame(8, Status::AppError, "division by zero"),
            frame: Frame::Reply(Reply {
                id: 8,
                status: Status::AppError,
                body: value("division by zero"),
                claim: None,
            }),
            check_body: |frame| {
                let Frame::Reply(reply) = frame else {
                    panic!("not a reply")
                };
                let decoded = codec::decode_value::<String>(&reply.body);
                assert_eq!(decoded.as_deref(), Ok("division by zero"));
            },
            answers: Some((div_dynamic_route, "call-div")),
        },
        "call-no-args" => Case {
            encoded: codec::encode_call(0, "m", "c", 1, &()).expect("encodable"),
            frame: Frame::Call(Call {
                id: 0,
                method: wire("m"),
                reply_to: wire("c"),
                deadline_ms: 1,
                args: Bytes::from_static(&[0x90]),
                trace: None,
            }),
            check_body: |frame| {
                let Frame::Call(call) = frame else {
                    panic!("not a call")
                };
                assert_eq!(codec::decode_args::<()>(&call.args), Ok(()));
            },
            answers: None,
        },
        "reply-overloaded" => Case {
            // As the dispatcher refuses a call at its in-flight limit.
            encoded: ReplyBody::from_encoded(codec::NIL)
                .into_frame(7, Status::Overloaded)
                .to_vec(),
            frame: Frame::Reply(Reply {
                id: 7,
                status: Status::Overloaded,
                body: Bytes::from_static(codec::NIL),
                claim: None,
            }),
            check_body: |frame| {
                let Frame::Reply(reply) = frame else {
                    panic!("not a reply")
                };
                assert_eq!(codec::decode_value::<Option<u8>>(&reply.body), Ok(None));
            },
            answers: None,
        },
        "message-hi" => Case {
            encoded: codec::encode_message("n1", &value("hi")),
            frame: Frame::Message {
                from: NodeId::from("n1"),
                body: value("hi"),
            },
            check_body: |frame| {
                let Frame::Message { body, .. } = frame else {
                    panic!("not a message")
                };
                assert_eq!(codec::decode_value::<String>(body).as_deref(), Ok("hi"));
            },
            answers: None,
        },
        "join" => Case {
            encoded: codec::encode_join("n1", &["a.b".to_string()]),
            frame: Frame::Join {
                node: NodeId::from("n1"),
                methods: vec!["a.b".to_string()],
            },
            check_body: |_| {},
            answers: None,
        },
        "leave" => Case {
            encoded: codec::encode_leave("n1"),
            frame: Frame::Leave {
                node: NodeId::from("n1"),
            },
            check_body: |_| {},
            answers: None,
        },
        "claimed-call" => Case {
            encoded: {
                let call = Bytes::from(
                    codec::encode_call(7, "test.hello", "client-a", 2000, &("Glen", "hi"))
                        .expect("encodable"),
                );
                let start = codec::body_start(&call).expect("a call");
                codec::encode_claimed(&call, start, &claimed_args())
            },
            frame: Frame::Claim {
                frame: Box::new(Frame::Call(Call {
                    id: 7,
                    method: wire("test.hello"),
                    reply_to: wire("client-a"),
                    deadline_ms: 2000,
                    args: Bytes::new(),
                    trace: None,
                })),
                claim: claimed_args(),
            },
            check_body: |_| {},
            answers: None,
        },
        _ => return None,
    })
}

/// The claim of the `claimed-call` example: the arguments of `call-hello` under the token
/// 0, 1, ... 15.
fn claimed_args() -> crate::envelope::ClaimRef {
    use sha2::Digest;
    let args = args(&("Glen", "hi"));
    crate::envelope::ClaimRef {
        token: std::array::from_fn(|i| i as u8),
        len: args.len() as u64,
        digest: sha2::Sha256::digest(&args).into(),
    }
}

/// Every example this module knows; §12 must hold exactly these.
const KNOWN: &[&str] = &[
    "call-hello",
    "reply-hello",
    "call-div",
    "reply-div-error",
    "reply-div-unit-struct",
    "reply-div-dynamic",
    "call-no-args",
    "reply-overloaded",
    "message-hi",
    "join",
    "leave",
    "claimed-call",
];

fn by_name() -> BTreeMap<String, Example> {
    let mut map = BTreeMap::new();
    for example in examples() {
        let name = example.name.clone();
        assert!(
            map.insert(name.clone(), example).is_none(),
            "§12 has two examples named `{name}`"
        );
    }
    map
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn section_12_holds_exactly_the_known_examples() {
    let names: Vec<String> = by_name().into_keys().collect();
    let mut known: Vec<String> = KNOWN.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(
        names, known,
        "the `hex <name>` blocks of docs/protocol.md §12 and the cases of spec_tests.rs differ"
    );
}

#[test]
fn every_example_is_what_the_encoder_writes() {
    for (name, example) in by_name() {
        let case = case(&name).unwrap_or_else(|| panic!("no case for §12 example `{name}`"));
        assert_eq!(
            hex_string(&example.bytes),
            hex_string(&case.encoded),
            "§12 example `{name}` (left) is not what the codec writes (right)"
        );
    }
}

#[test]
fn every_example_decodes_to_the_frame_described() {
    for (name, example) in by_name() {
        let case = case(&name).unwrap_or_else(|| panic!("no case for §12 example `{name}`"));
        let decoded = codec::decode(&Bytes::from(example.bytes.clone()))
            .unwrap_or_else(|e| panic!("§12 example `{name}` does not decode: {e}"));
        assert_eq!(decoded, case.frame, "§12 example `{name}`");
        (case.check_body)(&decoded);
    }
}

#[test]
fn every_reply_example_is_what_the_route_answers_to_its_call() {
    let examples = by_name();
    for (name, example) in &examples {
        let Some((route, call_name)) = case(name).and_then(|c| c.answers) else {
            continue;
        };
        let call_bytes = Bytes::from(examples[call_name].bytes.clone());
        let Ok(Frame::Call(call)) = codec::decode(&call_bytes) else {
            panic!("§12 example `{call_name}` is not a call");
        };
        let outcome = (route().handler)(call.args.clone())
            .now_or_never()
            .expect("the example handlers do not wait");
        let reply = outcome.body.into_frame(call.id, outcome.status);
        assert_eq!(
            hex_string(&example.bytes),
            hex_string(&reply),
            "§12 example `{name}` (left) is not what the route answers to `{call_name}` (right)"
        );
    }
}

#[test]
fn byte_tables_and_quoted_sizes_match_the_examples() {
    for (name, example) in by_name() {
        if let Some(listed) = &example.breakdown {
            assert_eq!(
                hex_string(listed),
                hex_string(&example.bytes),
                "the Bytes table under §12 example `{name}` (left) lists other bytes"
            );
        }
        if let Some(len) = example.quoted_len {
            assert_eq!(
                len,
                example.bytes.len(),
                "the size quoted before §12 example `{name}`"
            );
        }
    }
    // `<frame NAME: N bytes>` anywhere in §12 (the Redis traffic listings).
    let examples = by_name();
    let mut mentions = 0;
    for piece in section_12().split("<frame ").skip(1) {
        let mention = &piece[..piece.find('>').expect("`<frame ...>` is closed")];
        let (name, size) = mention
            .split_once(':')
            .unwrap_or_else(|| panic!("`<frame {mention}>` is not `<frame NAME: N bytes>`"));
        let size: usize = size
            .trim()
            .strip_suffix("bytes")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("`<frame {mention}>` is not `<frame NAME: N bytes>`"));
        let example = examples
            .get(name.trim())
            .unwrap_or_else(|| panic!("`<frame {mention}>` names no §12 example"));
        assert_eq!(size, example.bytes.len(), "`<frame {mention}>`");
        mentions += 1;
    }
    assert!(
        mentions > 0,
        "§12's Redis traffic names its frames as `<frame NAME: N bytes>`"
    );
}

#[test]
fn the_reader_of_section_12_finds_tables_and_sizes() {
    // The checks above pass vacuously if the reader finds nothing: make sure it does.
    let examples = by_name();
    assert!(examples["call-hello"].breakdown.is_some());
    assert!(examples["reply-div-error"].breakdown.is_some());
    assert_eq!(examples["call-hello"].quoted_len, Some(36));
    assert_eq!(hex("01 9a"), Some(vec![0x01, 0x9a]));
    assert_eq!(hex("01 9a\nzz"), None);
    assert_eq!(quoted_len("Call frame (36 bytes):"), Some(36));
    assert_eq!(
        table_bytes(&["| `aa` `74 65` | fixstr(2) `te` |", "| `01` | x |"]),
        vec![0xaa, 0x74, 0x65, 0x01]
    );
}
