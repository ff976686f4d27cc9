//! What the server owes the client. PostgreSQL answers the messages sent to it in order, so a
//! queue of expected answers tells where a transaction ends (ReadyForQuery with nothing else
//! outstanding: the server connection may go back to the pool), which answers belong to
//! messages the pooler sent on its own (dropped), and where answers the pooler gives itself
//! belong (a statement already prepared on this server connection gets its ParseComplete
//! without asking the server).

use std::collections::VecDeque;

use bytes::Bytes;

/// An extended-protocol message, by the answer that ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
}

impl Step {
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Step::Parse => tag == b'1',
            Step::Bind => tag == b'2',
            Step::Close => tag == b'3',
            Step::Describe => matches!(tag, b'T' | b'n'),
            Step::Execute => matches!(tag, b'C' | b'I' | b's'),
        }
    }
}

/// A statement the pooler prepared under its own name; it exists on the server once the
/// ParseComplete arrives, and is forgotten if the Parse fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub id: u64,
    /// The client's name for it, when the Parse was the client's own.
    pub client_name: Option<Bytes>,
}

#[derive(Debug)]
enum Expect {
    /// Query, FunctionCall or Sync: answered up to ReadyForQuery.
    Ready { ours: bool },
    /// One extended-protocol message.
    Step {
        step: Step,
        ours: bool,
        prepares: Option<Prepared>,
    },
    /// An answer the pooler gives the client itself, when its turn comes.
    Owed(Bytes),
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop,
}

/// The answers outstanding on one client's link to a server connection.
#[derive(Debug)]
pub struct Flow {
    queue: VecDeque<Expect>,
    /// An extended-protocol message failed with no Sync queued yet: the server ignores what
    /// follows until the client's Sync.
    skipping: bool,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// Transaction status of the last ReadyForQuery the client saw (`I`, `T` or `E`).
    pub status: u8,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            skipping: false,
            unsynced: false,
            status: b'I',
        }
    }
}

impl Flow {
    /// Nothing outstanding, no transaction open: the server connection may change hands.
    pub fn at_rest(&self) -> bool {
        self.queue.is_empty() && !self.unsynced && self.status == b'I'
    }

    /// No answer outstanding.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The server is ignoring messages until the next Sync.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// A Query, FunctionCall or Sync went to the server (`ours`: its answers are dropped).
    pub fn sent_ready(&mut self, ours: bool, sync: bool) {
        if sync {
            self.unsynced = false;
        }
        self.skipping = false;
        self.queue.push_back(Expect::Ready { ours });
    }

    /// An extended-protocol message went to the server. Returns false when the server will
    /// ignore it (an earlier message of the batch failed).
    pub fn sent_step(&mut self, step: Step, ours: bool, prepares: Option<Prepared>) -> bool {
        self.unsynced = true;
        if self.skipping {
            return false;
        }
        self.queue.push_back(Expect::Step {
            step,
            ours,
            prepares,
        });
        true
    }

    /// The pooler owes the client `answer` once every earlier answer has gone out.
    pub fn owe(&mut self, answer: Bytes) {
        if !self.skipping {
            self.queue.push_back(Expect::Owed(answer));
        }
    }

    /// Whether an answer from the pooler itself is due before the next server message.
    pub fn owes_now(&self) -> bool {
        matches!(self.queue.front(), Some(Expect::Owed(_)))
    }

    /// Moves the answers now due from the pooler itself into `out`.
    pub fn pay(&mut self, out: &mut bytes::BytesMut) {
        while let Some(Expect::Owed(answer)) = self.queue.front() {
            out.extend_from_slice(answer);
            self.queue.pop_front();
        }
    }

    /// Accounts for one server message with `tag` (`status`: ReadyForQuery's status byte).
    /// `done` hears of statements whose Parse completed (true) or failed (false).
    pub fn received(
        &mut self,
        tag: u8,
        status: u8,
        mut done: impl FnMut(Prepared, bool),
    ) -> Verdict {
        // Asynchronous messages may come at any time; they follow their surroundings.
        let asynchronous = matches!(tag, b'N' | b'A' | b'S');
        match self.queue.front_mut() {
            None => Verdict::Forward,
            Some(Expect::Ready { ours }) => {
                let ours = *ours;
                if tag == b'Z' {
                    self.queue.pop_front();
                    if !ours {
                        self.status = status;
                    }
                }
                if ours {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            }
            Some(Expect::Step { step, ours, .. }) => {
                let (step, ours) = (*step, *ours);
                if asynchronous {
                    return if ours {
                        Verdict::Drop
                    } else {
                        Verdict::Forward
                    };
                }
                if tag == b'E' || tag == b'Z' {
                    // The server skips to the next Sync: so do the answers expected before it.
                    while let Some(front) = self.queue.front() {
                        if matches!(front, Expect::Ready { .. }) {
                            break;
                        }
                        if let Some(Expect::Step {
                            prepares: Some(p), ..
                        }) = self.queue.pop_front()
                        {
                            done(p, false);
                        }
                    }
                    if self.queue.is_empty() {
                        self.skipping = tag == b'E';
                    }
                    if tag == b'Z' {
                        // Out of step (the server answered what was not asked): re-enter.
                        return self.received(tag, status, done);
                    }
                    return Verdict::Forward;
                }
                if step.ends_with(tag) {
                    if let Some(Expect::Step {
                        prepares: Some(p), ..
                    }) = self.queue.pop_front()
                    {
                        done(p, true);
                    }
                }
                if ours {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            }
            // `pay` runs before every server message; an owed answer at the front means the
            // server spoke out of turn.
            Some(Expect::Owed(_)) => Verdict::Forward,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(flow: &mut Flow, tags: &[u8]) -> (Vec<u8>, Vec<(u64, bool)>) {
        let mut forwarded = Vec::new();
        let mut prepared = Vec::new();
        let mut out = bytes::BytesMut::new();
        for &tag in tags {
            flow.pay(&mut out);
            forwarded.extend(out.split().iter().copied());
            let verdict = flow.received(tag, b'I', |p, ok| prepared.push((p.id, ok)));
            if verdict == Verdict::Forward {
                forwarded.push(tag);
            }
        }
        flow.pay(&mut out);
        forwarded.extend(out.iter().copied());
        (forwarded, prepared)
    }

    #[test]
    fn a_simple_query_ends_at_ready_for_query() {
        let mut flow = Flow::default();
        flow.sent_ready(false, false);
        assert!(!flow.at_rest());
        let (out, _) = run(&mut flow, b"TDDCZ");
        assert_eq!(out, b"TDDCZ");
        assert!(flow.at_rest());
    }

    #[test]
    fn the_poolers_own_answers_are_dropped_and_owed_ones_slot_in() {
        let mut flow = Flow::default();
        flow.sent_ready(true, false); // a SET the pooler sends to match parameters
        let prepares = Prepared {
            id: 7,
            client_name: None,
        };
        assert!(flow.sent_step(Step::Parse, true, Some(prepares)));
        flow.owe(Bytes::from_static(b"1")); // the client's Parse of a known statement
        flow.sent_step(Step::Bind, false, None);
        flow.sent_step(Step::Execute, false, None);
        flow.sent_ready(false, true);
        let (out, prepared) = run(&mut flow, b"SCZ12DCZ");
        assert_eq!(out, b"12DCZ");
        assert_eq!(prepared, vec![(7, true)]);
        assert!(flow.at_rest());
    }

    #[test]
    fn an_error_skips_to_the_sync() {
        let mut flow = Flow::default();
        let p = |id| {
            Some(Prepared {
                id,
                client_name: None,
            })
        };
        flow.sent_step(Step::Parse, false, p(1));
        flow.sent_step(Step::Parse, false, p(2));
        flow.owe(Bytes::from_static(b"3"));
        flow.sent_step(Step::Bind, false, None);
        flow.sent_ready(false, true);
        let (out, prepared) = run(&mut flow, b"1EZ");
        assert_eq!(out, b"1EZ");
        assert_eq!(prepared, vec![(1, true), (2, false)]);
        assert!(flow.at_rest());
    }

    #[test]
    fn without_a_sync_the_server_ignores_what_follows_an_error() {
        let mut flow = Flow::default();
        flow.sent_step(Step::Bind, false, None);
        let (out, _) = run(&mut flow, b"E");
        assert_eq!(out, b"E");
        assert!(flow.skipping());
        assert!(!flow.sent_step(Step::Execute, false, None));
        assert!(!flow.at_rest());
        flow.sent_ready(false, true);
        let (out, _) = run(&mut flow, b"Z");
        assert_eq!(out, b"Z");
        assert!(flow.at_rest());
    }

    #[test]
    fn a_transaction_in_progress_is_not_at_rest() {
        let mut flow = Flow::default();
        flow.sent_ready(false, false);
        flow.pay(&mut bytes::BytesMut::new());
        assert_eq!(flow.received(b'C', 0, |_, _| {}), Verdict::Forward);
        assert_eq!(flow.received(b'Z', b'T', |_, _| {}), Verdict::Forward);
        assert!(!flow.at_rest());
        flow.sent_step(Step::Execute, false, None);
        assert!(!flow.at_rest());
    }
}
