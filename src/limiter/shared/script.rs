//! The budget script (`budget.lua`): its Redis key layout, the arguments of each operation, and
//! its replies. No I/O here.
//!
//! # Key layout
//! Every name starts with the namespace and carries no credential: a key is its 64-bit hash, in
//! hex. Per budget there is a log (sorted set) and a state (hash):
//! - without a global ceiling, each key has a hash tag of its own, `{ns:HASH}:log` and
//!   `{ns:HASH}:st`, so on Redis Cluster keys spread over the nodes;
//! - with one, every key and the ceiling share the tag `{ns}` (`{ns}:HASH:log`, `{ns}:global:log`),
//!   since one script must charge a key and the ceiling together: one slot, so one node, holds
//!   the whole budget. That is the trade-off: a ceiling across keys needs one place to count.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::link::LinkError;
use crate::limiter::{Key, Quota};

/// The one script of the shared budget, run by EVALSHA (and loaded on NOSCRIPT).
pub(super) static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("budget.lua")));

/// Microseconds, the script's unit.
pub(super) type Micros = i64;

/// Where the budget's Redis keys live.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    namespace: String,
    /// Every key in one hash slot, because a global ceiling is charged with each key.
    one_slot: bool,
}

impl Layout {
    pub(super) fn new(namespace: &str, global_ceiling: bool) -> Self {
        Self {
            namespace: namespace.to_owned(),
            one_slot: global_ceiling,
        }
    }

    /// Whether every key shares one hash slot (a global ceiling was set at start).
    pub(super) fn one_slot(&self) -> bool {
        self.one_slot
    }

    /// The log and state of `key`.
    pub(super) fn names(&self, key: Key) -> [String; 2] {
        let (ns, hash) = (&self.namespace, key.id());
        match (key == Key::GLOBAL, self.one_slot) {
            (true, _) => [
                format!("{{{ns}}}:global:log"),
                format!("{{{ns}}}:global:st"),
            ],
            (false, true) => [
                format!("{{{ns}}}:{hash:016x}:log"),
                format!("{{{ns}}}:{hash:016x}:st"),
            ],
            (false, false) => [
                format!("{{{ns}:{hash:016x}}}:log"),
                format!("{{{ns}:{hash:016x}}}:st"),
            ],
        }
    }
}

/// A quota in the script's terms: capacity, window, pacing spacing and tolerance, in µs.
fn quota_args(inv: &mut ScriptInvocation<'_>, quota: Quota) {
    inv.arg(quota.capacity)
        .arg(quota.window / 1000)
        .arg(quota.spacing() / 1000)
        .arg(quota.pacing_tolerance() / 1000);
}

/// One token asked for by an acquire: how long it may wait, and the sequence numbers that make
/// its stamps' members unique.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    pub(super) max_wait: Micros,
    pub(super) key_seq: u64,
    pub(super) global_seq: u64,
}

/// The script's answer for one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    Admitted {
        at: Micros,
        remaining: u32,
        next_free: Micros,
        /// The global stamp, `None` without a ceiling.
        global: Option<GlobalSlot>,
        /// The sequence numbers of the members written (the script picks free ones).
        key_seq: u64,
        global_seq: u64,
    },
    KeyDenied {
        next_free: Micros,
        in_window: u32,
        paused: bool,
    },
    GlobalDenied {
        next_free: Micros,
        in_window: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GlobalSlot {
    At(Micros),
    /// Taken when the key's turn comes (`resume`).
    AtTurn,
}

pub(super) fn acquire<'a>(
    layout: &Layout,
    replica: &str,
    key: Key,
    quota: Quota,
    global: Option<Quota>,
    asks: &[Ask],
) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    let [log, st] = layout.names(key);
    inv.key(log).key(st);
    let [glog, gst] = layout.names(Key::GLOBAL);
    if global.is_some() {
        inv.key(glog).key(gst);
    }
    inv.arg("acquire").arg(replica);
    quota_args(&mut inv, quota);
    match global {
        Some(g) => quota_args(&mut inv, g),
        None => {
            inv.arg(0).arg(0).arg(0).arg(0);
        }
    }
    for ask in asks {
        inv.arg(ask.max_wait.max(0))
            .arg(ask.key_seq % 1000)
            .arg(ask.global_seq % 1000);
    }
    inv
}

/// Redis's clock at the call, and one answer per token asked.
pub(super) fn acquire_reply(value: Value) -> Result<(Micros, Vec<Answer>), LinkError> {
    let (now, rows) = split(value)?;
    let answers = rows
        .into_iter()
        .map(|row| {
            let ints = ints(row)?;
            let at = |i: usize| ints.get(i).copied().ok_or_else(|| bad("short row"));
            let count = |i: usize| at(i).map(|v| u32::try_from(v.max(0)).unwrap_or(u32::MAX));
            let seq = |i: usize| ints.get(i).map_or(0, |&v| v.max(0) as u64);
            Ok(match at(0)? {
                1 => Answer::Admitted {
                    at: at(1)?,
                    remaining: count(2)?,
                    next_free: at(3)?,
                    global: match at(4)? {
                        -1 => None,
                        -2 => Some(GlobalSlot::AtTurn),
                        g => Some(GlobalSlot::At(g)),
                    },
                    key_seq: seq(5),
                    global_seq: seq(6),
                },
                0 => Answer::KeyDenied {
                    next_free: at(1)?,
                    in_window: count(2)?,
                    paused: at(3)? == 1,
                },
                2 => Answer::GlobalDenied {
                    next_free: at(1)?,
                    in_window: count(2)?,
                },
                other => return Err(bad(&format!("answer kind {other}"))),
            })
        })
        .collect::<Result<_, LinkError>>()?;
    Ok((now, answers))
}

/// What `resume` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resumed {
    /// Free to go; the global stamp (and its sequence number) if one was taken.
    Go(Option<(Micros, u64)>),
    Paused,
    GlobalDenied {
        next_free: Micros,
        in_window: u32,
    },
}

pub(super) fn resume<'a>(
    layout: &Layout,
    replica: &str,
    key: Key,
    global: Option<Quota>,
    max_wait: Micros,
    global_seq: u64,
) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    let [log, st] = layout.names(key);
    inv.key(log).key(st);
    // The ceiling's keys only when it is charged: on Redis Cluster they may be in another slot.
    if global.is_some() {
        let [glog, gst] = layout.names(Key::GLOBAL);
        inv.key(glog).key(gst);
    }
    inv.arg("resume").arg(replica);
    match global {
        Some(g) => quota_args(&mut inv, g),
        None => {
            inv.arg(0).arg(0).arg(0).arg(0);
        }
    }
    inv.arg(max_wait.max(0)).arg(global_seq % 1000);
    inv
}

pub(super) fn resume_reply(value: Value) -> Result<(Micros, Resumed), LinkError> {
    let ints = ints(value)?;
    let at = |i: usize| ints.get(i).copied().ok_or_else(|| bad("short reply"));
    let resumed = match at(1)? {
        0 => Resumed::Paused,
        1 => Resumed::Go(
            Some((at(2)?, ints.get(3).map_or(0, |&v| v.max(0) as u64))).filter(|&(g, _)| g >= 0),
        ),
        _ => Resumed::GlobalDenied {
            next_free: at(2)?,
            in_window: u32::try_from(at(3)?.max(0)).unwrap_or(u32::MAX),
        },
    };
    Ok((at(0)?, resumed))
}

/// One stamp to move to Redis's `now` at departure.
#[derive(Debug, Clone, Copy)]
pub(super) struct Move {
    pub(super) key: Key,
    pub(super) quota: Quota,
    pub(super) at: Micros,
    pub(super) seq: u64,
    pub(super) new_seq: u64,
}

pub(super) fn confirm<'a>(layout: &Layout, replica: &str, moves: &[Move]) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    for m in moves {
        let [log, st] = layout.names(m.key);
        inv.key(log).key(st);
    }
    inv.arg("confirm").arg(replica);
    for m in moves {
        inv.arg(m.at).arg(m.seq % 1000).arg(m.new_seq % 1000);
        quota_args(&mut inv, m.quota);
    }
    inv
}

/// What `confirm` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Confirmed {
    /// Every stamp moved to Redis's now (the reply's clock), under these sequence numbers.
    Moved(Micros, Vec<u64>),
    Paused,
    NoLongerFits,
}

pub(super) fn confirm_reply(value: Value) -> Result<Confirmed, LinkError> {
    let ints = ints(value)?;
    let at = |i: usize| ints.get(i).copied().ok_or_else(|| bad("short reply"));
    Ok(match (at(1)?, ints.get(2).copied()) {
        (1, _) => Confirmed::Moved(at(0)?, ints[2..].iter().map(|&v| v.max(0) as u64).collect()),
        (_, Some(1)) => Confirmed::Paused,
        _ => Confirmed::NoLongerFits,
    })
}

/// Gives back stamps (key, at, seq).
pub(super) fn release<'a>(
    layout: &Layout,
    replica: &str,
    stamps: &[(Key, Micros, u64)],
) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    for (key, _, _) in stamps {
        inv.key(layout.names(*key)[0].clone());
    }
    inv.arg("release").arg(replica);
    for (_, at, seq) in stamps {
        inv.arg(member(*at, *seq, replica));
    }
    inv
}

pub(super) fn pause<'a>(
    layout: &Layout,
    replica: &str,
    key: Key,
    wait: Micros,
    window: Micros,
) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    let [log, st] = layout.names(key);
    inv.key(log).key(st);
    inv.arg("pause").arg(replica).arg(wait.max(0)).arg(window);
    inv
}

/// Adds admissions made `ago` µs before Redis's now (negative: queued for later), with their
/// sequence numbers, to `key`'s log.
pub(super) fn record<'a>(
    layout: &Layout,
    replica: &str,
    key: Key,
    window: Micros,
    stamps: &[(Micros, u64)],
) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    inv.key(layout.names(key)[0].clone());
    inv.arg("record").arg(replica).arg(window);
    for (ago, seq) in stamps {
        inv.arg(*ago).arg(seq % 1000);
    }
    inv
}

/// A call that only proves Redis answers and the script runs; returns Redis's clock.
pub(super) fn ping<'a>(layout: &Layout, replica: &str) -> ScriptInvocation<'a> {
    let mut inv = SCRIPT.prepare_invoke();
    inv.key(layout.names(Key::GLOBAL)[0].clone());
    inv.arg("ping").arg(replica);
    inv
}

/// A stamp's member in a log, as the script writes it.
pub(super) fn member(at: Micros, seq: u64, replica: &str) -> String {
    format!("{at}:{}:{replica}", seq % 1000)
}

fn split(value: Value) -> Result<(Micros, Vec<Value>), LinkError> {
    let Value::Array(mut items) = value else {
        return Err(bad("not an array"));
    };
    if items.is_empty() {
        return Err(bad("empty reply"));
    }
    let rest = items.split_off(1);
    let now = redis::from_redis_value::<i64>(items.remove(0)).map_err(|e| bad(&e.to_string()))?;
    Ok((now, rest))
}

fn ints(value: Value) -> Result<Vec<i64>, LinkError> {
    redis::from_redis_value::<Vec<i64>>(value).map_err(|e| bad(&e.to_string()))
}

fn bad(what: &str) -> LinkError {
    LinkError::Reply(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hold_no_credential_and_share_a_tag_only_with_a_ceiling() {
        let key = Key::of("secret-api-key");
        let spread = Layout::new("ns", false).names(key);
        let one = Layout::new("ns", true).names(key);
        let hash = format!("{:016x}", key.id());
        assert_eq!(
            spread,
            [format!("{{ns:{hash}}}:log"), format!("{{ns:{hash}}}:st")]
        );
        assert_eq!(
            one,
            [format!("{{ns}}:{hash}:log"), format!("{{ns}}:{hash}:st")]
        );
        assert_eq!(
            Layout::new("ns", true).names(Key::GLOBAL)[0],
            "{ns}:global:log"
        );
        assert!(!spread.iter().chain(&one).any(|n| n.contains("secret")));
    }

    #[test]
    fn replies_are_decoded_and_nonsense_is_an_error() {
        let row = |v: &[i64]| Value::Array(v.iter().map(|&i| Value::Int(i)).collect());
        let reply = Value::Array(vec![
            Value::Int(100),
            row(&[1, 100, 4, 100, -1, 7, -1]),
            row(&[1, 2000, 0, 3000, -2, 8, -1]),
            row(&[0, 5000, 5, 1]),
            row(&[2, 900, 10]),
        ]);
        let (now, answers) = acquire_reply(reply).unwrap();
        assert_eq!(now, 100);
        assert_eq!(
            answers,
            [
                Answer::Admitted {
                    at: 100,
                    remaining: 4,
                    next_free: 100,
                    global: None,
                    key_seq: 7,
                    global_seq: 0
                },
                Answer::Admitted {
                    at: 2000,
                    remaining: 0,
                    next_free: 3000,
                    global: Some(GlobalSlot::AtTurn),
                    key_seq: 8,
                    global_seq: 0
                },
                Answer::KeyDenied {
                    next_free: 5000,
                    in_window: 5,
                    paused: true
                },
                Answer::GlobalDenied {
                    next_free: 900,
                    in_window: 10
                },
            ]
        );
        assert!(acquire_reply(Value::Nil).is_err());
        assert!(acquire_reply(Value::Array(vec![Value::Int(1), row(&[7])])).is_err());
        assert!(acquire_reply(Value::Array(vec![Value::Int(1), row(&[1, 2])])).is_err());
        assert_eq!(
            confirm_reply(row(&[5, 1, 3, 4])).unwrap(),
            Confirmed::Moved(5, vec![3, 4])
        );
        assert_eq!(confirm_reply(row(&[5, 0, 1])).unwrap(), Confirmed::Paused);
        assert_eq!(
            confirm_reply(row(&[5, 0, 0])).unwrap(),
            Confirmed::NoLongerFits
        );
        assert_eq!(resume_reply(row(&[5, 0])).unwrap(), (5, Resumed::Paused));
        assert_eq!(
            resume_reply(row(&[5, 1, -1, -1])).unwrap(),
            (5, Resumed::Go(None))
        );
        assert_eq!(
            resume_reply(row(&[5, 1, 9, 2])).unwrap(),
            (5, Resumed::Go(Some((9, 2))))
        );
    }
}
