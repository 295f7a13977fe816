//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), for
//! the kinds kubectl's typed client sends that way and a test needs:
//! `Namespace` (`kubectl create namespace`). The body is the apiserver's
//! envelope — the magic `k8s\0`, then a `runtime.Unknown` message whose
//! `raw` field holds the object — decoded by hand with the field numbers
//! of k8s.io/api's `generated.proto`. Other kinds are refused with the
//! apiserver's 415 for a media type a resource does not accept.

use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

/// One protobuf field: number and either a varint or bytes.
enum Wire<'a> {
    /// A varint (no field decoded here needs its value).
    Varint,
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn fields(buf: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(buf, &mut pos)?;
                out.push((number, Wire::Varint));
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len())?;
                out.push((number, Wire::Bytes(&buf[pos..end])));
                pos = end;
            }
            1 => pos += 8,
            5 => pos += 4,
            _ => return None,
        }
    }
    Some(out)
}

fn string(b: &[u8]) -> Option<Value> {
    Some(Value::String(String::from_utf8(b.to_vec()).ok()?))
}

fn string_map(entries: &[&[u8]]) -> Option<Value> {
    let mut m = Map::new();
    for e in entries {
        let (mut k, mut v) = (String::new(), String::new());
        for (n, w) in fields(e)? {
            if let Wire::Bytes(b) = w {
                let s = String::from_utf8(b.to_vec()).ok()?;
                if n == 1 {
                    k = s
                } else if n == 2 {
                    v = s
                }
            }
        }
        m.insert(k, Value::String(v));
    }
    Some(Value::Object(m))
}

/// `ObjectMeta` fields a client sets when creating.
fn object_meta(buf: &[u8]) -> Option<Value> {
    let mut meta = Map::new();
    let (mut labels, mut annotations, mut finalizers) = (Vec::new(), Vec::new(), Vec::new());
    for (n, w) in fields(buf)? {
        match (n, w) {
            (1, Wire::Bytes(b)) => _ = meta.insert("name".into(), string(b)?),
            (2, Wire::Bytes(b)) => _ = meta.insert("generateName".into(), string(b)?),
            (3, Wire::Bytes(b)) => _ = meta.insert("namespace".into(), string(b)?),
            (6, Wire::Bytes(b)) => _ = meta.insert("resourceVersion".into(), string(b)?),
            (11, Wire::Bytes(b)) => labels.push(b),
            (12, Wire::Bytes(b)) => annotations.push(b),
            (14, Wire::Bytes(b)) => finalizers.push(string(b)?),
            _ => {}
        }
    }
    if !labels.is_empty() {
        meta.insert("labels".into(), string_map(&labels)?);
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), string_map(&annotations)?);
    }
    if !finalizers.is_empty() {
        meta.insert("finalizers".into(), Value::Array(finalizers));
    }
    Some(Value::Object(meta))
}

/// `Namespace`: metadata = 1, spec = 2 (finalizers = 1).
fn namespace(buf: &[u8]) -> Option<Value> {
    let mut obj = json!({"apiVersion": "v1", "kind": "Namespace"});
    for (n, w) in fields(buf)? {
        match (n, w) {
            (1, Wire::Bytes(b)) => obj["metadata"] = object_meta(b)?,
            (2, Wire::Bytes(b)) => {
                let mut fin = Vec::new();
                for (fnum, fw) in fields(b)? {
                    if let (1, Wire::Bytes(s)) = (fnum, fw) {
                        fin.push(string(s)?);
                    }
                }
                obj["spec"] = json!({"finalizers": fin});
            }
            _ => {}
        }
    }
    Some(obj)
}

/// Why a protobuf body was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not the envelope, or not decodable: 400.
    Malformed(String),
    /// A kind whose protobuf form the stand-in does not decode: 415.
    Unsupported(String),
}

/// The JSON form of a protobuf request body.
pub fn decode(body: &[u8]) -> Result<Value, Refused> {
    let malformed = |what: &str| Refused::Malformed(what.to_string());
    let rest =
        body.strip_prefix(MAGIC).ok_or_else(|| malformed("missing the k8s protobuf envelope"))?;
    let (mut kind, mut api_version, mut raw) = (String::new(), String::new(), None);
    for (n, w) in fields(rest).ok_or_else(|| malformed("invalid protobuf"))? {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (tn, tw) in fields(tm).ok_or_else(|| malformed("invalid TypeMeta"))? {
                    if let Wire::Bytes(b) = tw {
                        let s = String::from_utf8_lossy(b).into_owned();
                        if tn == 1 {
                            api_version = s
                        } else if tn == 2 {
                            kind = s
                        }
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = Some(b),
            _ => {}
        }
    }
    let raw = raw.ok_or_else(|| malformed("no object in the envelope"))?;
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => namespace(raw).ok_or_else(|| malformed("invalid Namespace")),
        _ => Err(Refused::Unsupported(format!("{api_version}, Kind={kind}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3 | 2) as u8, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn namespace_in_the_envelope() {
        let label = [field(1, b"team"), field(2, b"dsr")].concat();
        let meta = [field(1, b"shop"), field(11, &label)].concat();
        let ns = [field(1, &meta), field(2, &[]), field(3, &[])].concat();
        let tm = [field(1, b"v1"), field(2, b"Namespace")].concat();
        let body = [MAGIC.to_vec(), field(1, &tm), field(2, &ns)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(v["metadata"]["name"], "shop");
        assert_eq!(v["metadata"]["labels"]["team"], "dsr");
        let tm = [field(1, b"v1"), field(2, b"Pod")].concat();
        let body = [MAGIC.to_vec(), field(1, &tm), field(2, &ns)].concat();
        assert!(matches!(decode(&body), Err(Refused::Unsupported(_))));
        assert!(matches!(decode(b"{}"), Err(Refused::Malformed(_))));
    }
}
