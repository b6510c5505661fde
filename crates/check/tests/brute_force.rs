//! Property tests: on random small histories (at most 7 operations, up to 3 clients, some
//! unknown outcomes, ties in time), the checker agrees with a brute-force checker that tries
//! every order, for each built-in model, with and without partitioning by key.
//!
//! Histories are generated from a true execution (each operation takes effect at a random point
//! inside its interval) and then some answers are corrupted, so both verdicts are common.

use proptest::prelude::*;
use shoal_check::models::{
    AppendKv, AppendKvInput, AppendKvOutput, Expected, KeyMap, KvInput, KvOutput, Register,
    RegisterInput, RegisterOutput, VersionedKv,
};
use shoal_check::{
    check_with_options, Budget, CheckOptions, History, HistoryBuilder, Model, Operation, Verdict,
};

/// How a generated operation ends.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Answered with the true output.
    True,
    /// Answered with an arbitrary output.
    Corrupt(u8),
    /// Never answered; `applied` says whether it took effect in the true execution.
    Unknown { applied: bool },
}

#[derive(Debug, Clone)]
struct Spec {
    client: u8,
    input: u8,
    gap: u8,
    duration: u8,
    point: u8,
    fate: Fate,
}

fn spec() -> impl Strategy<Value = Spec> {
    let fate = prop_oneof![
        6 => Just(Fate::True),
        2 => any::<u8>().prop_map(Fate::Corrupt),
        1 => any::<bool>().prop_map(|applied| Fate::Unknown { applied }),
    ];
    (0u8..3, any::<u8>(), 0u8..3, 0u8..4, any::<u8>(), fate).prop_map(
        |(client, input, gap, duration, point, fate)| Spec {
            client,
            input,
            gap,
            duration,
            point,
            fate,
        },
    )
}

/// What a model needs to generate histories.
trait Generate: Model {
    fn input(&self, choice: u8) -> Self::Input;
    /// The answer a correct object gives (possibly "maybe" when `choice` says so).
    fn truth(&self, state: &Self::State, input: &Self::Input, choice: u8) -> Self::Output;
    /// An arbitrary answer of the right kind or not.
    fn corrupt(&self, input: &Self::Input, choice: u8) -> Self::Output;
}

impl Generate for Register {
    fn input(&self, c: u8) -> RegisterInput {
        let v = |x: u8| (1 + x % 2).to_string();
        match c % 4 {
            0 | 1 => RegisterInput::Read,
            2 => RegisterInput::Write(v(c / 4)),
            _ => RegisterInput::Cas {
                from: v(c / 4),
                to: v(c / 8),
            },
        }
    }
    fn truth(&self, state: &Option<String>, input: &RegisterInput, _: u8) -> RegisterOutput {
        match input {
            RegisterInput::Read => RegisterOutput::Value(state.clone()),
            RegisterInput::Write(_) => RegisterOutput::Ok,
            RegisterInput::Cas { from, .. } if state.as_deref() == Some(from.as_str()) => {
                RegisterOutput::Ok
            }
            RegisterInput::Cas { .. } => RegisterOutput::Failed,
        }
    }
    fn corrupt(&self, _: &RegisterInput, c: u8) -> RegisterOutput {
        match c % 5 {
            0 => RegisterOutput::Value(None),
            1 => RegisterOutput::Value(Some("1".into())),
            2 => RegisterOutput::Value(Some("2".into())),
            3 => RegisterOutput::Ok,
            _ => RegisterOutput::Failed,
        }
    }
}

fn expected_version(c: u8) -> Expected {
    match c % 4 {
        0 => Expected::Any,
        v => Expected::Version(u64::from(v - 1)),
    }
}

impl Generate for VersionedKv {
    fn input(&self, c: u8) -> KvInput {
        let key = if c.is_multiple_of(2) { "a" } else { "b" }.to_string();
        match (c / 2) % 5 {
            0 | 1 => KvInput::Get { key },
            2 | 3 => KvInput::Put {
                key,
                value: if (c / 10).is_multiple_of(2) { "x" } else { "y" }.to_string(),
                expected: expected_version(c / 20),
            },
            _ => KvInput::Delete {
                key,
                expected: expected_version(c / 20),
            },
        }
    }
    fn truth(&self, state: &KeyMap<(String, u64)>, input: &KvInput, c: u8) -> KvOutput {
        let current = state.get(input.key());
        let output = match input {
            KvInput::Get { .. } => {
                return match current {
                    Some((value, version)) => KvOutput::Found {
                        value: value.clone(),
                        version: *version,
                    },
                    None => KvOutput::NoKey,
                }
            }
            KvInput::Put { expected, .. } => match (current, expected) {
                (None, Expected::Any | Expected::Version(0)) => KvOutput::Written { version: 1 },
                (None, _) => KvOutput::NoKey,
                (Some((_, v)), Expected::Any) => KvOutput::Written { version: v + 1 },
                (Some((_, v)), Expected::Version(e)) if e == v => {
                    KvOutput::Written { version: v + 1 }
                }
                (Some(_), _) => KvOutput::VersionMismatch,
            },
            KvInput::Delete { expected, .. } => match (current, expected) {
                (None, _) => KvOutput::NoKey,
                (Some(_), Expected::Any) => KvOutput::Deleted,
                (Some((_, v)), Expected::Version(e)) if e == v => KvOutput::Deleted,
                (Some(_), _) => KvOutput::VersionMismatch,
            },
        };
        // A correct server may answer "maybe" to a write it applied (or refused).
        if c.is_multiple_of(5) {
            KvOutput::Maybe
        } else {
            output
        }
    }
    fn corrupt(&self, _: &KvInput, c: u8) -> KvOutput {
        match c % 7 {
            0 => KvOutput::NoKey,
            1 => KvOutput::Found {
                value: "x".into(),
                version: u64::from(c / 7 % 3),
            },
            2 => KvOutput::Found {
                value: "y".into(),
                version: 1,
            },
            3 => KvOutput::Written {
                version: u64::from(c / 7 % 3) + 1,
            },
            4 => KvOutput::Deleted,
            5 => KvOutput::VersionMismatch,
            _ => KvOutput::Maybe,
        }
    }
}

impl Generate for AppendKv {
    fn input(&self, c: u8) -> AppendKvInput {
        let key = if c.is_multiple_of(2) { "a" } else { "b" }.to_string();
        let value = if (c / 6).is_multiple_of(2) { "x" } else { "y" }.to_string();
        match (c / 2) % 3 {
            0 => AppendKvInput::Get { key },
            1 => AppendKvInput::Put { key, value },
            _ => AppendKvInput::Append { key, value },
        }
    }
    fn truth(&self, state: &KeyMap<String>, input: &AppendKvInput, _: u8) -> AppendKvOutput {
        match input {
            AppendKvInput::Get { key } => {
                AppendKvOutput::Value(state.get(key).cloned().unwrap_or_default())
            }
            _ => AppendKvOutput::Ok,
        }
    }
    fn corrupt(&self, _: &AppendKvInput, c: u8) -> AppendKvOutput {
        const VALUES: [&str; 6] = ["", "x", "y", "xy", "yx", "xx"];
        match c % 7 {
            6 => AppendKvOutput::Ok,
            i => AppendKvOutput::Value(VALUES[usize::from(i)].to_string()),
        }
    }
}

/// Builds a history from specs: each client's operations are sequential; a true execution
/// (ordered by each operation's point inside its interval) gives the answers.
fn build<M: Generate>(model: &M, specs: &[Spec]) -> History<M::Input, M::Output> {
    let mut cursor = [0u64; 3];
    struct Planned<I> {
        client: u64,
        input: I,
        invoked: u64,
        returned: u64,
        point: u64,
    }
    let mut planned = Vec::new();
    for s in specs {
        let c = usize::from(s.client);
        let invoked = cursor[c] + u64::from(s.gap);
        let returned = invoked + u64::from(s.duration);
        cursor[c] = returned;
        // Points in half-units so that they fall strictly inside or on the interval.
        let point = invoked * 2 + u64::from(s.point) % (u64::from(s.duration) * 2 + 1);
        planned.push(Planned {
            client: u64::from(s.client),
            input: model.input(s.input),
            invoked,
            returned,
            point,
        });
    }
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by_key(|&i| (planned[i].point, i));
    let mut outputs: Vec<Option<M::Output>> = vec![None; planned.len()];
    let mut state = model.init();
    for i in order {
        let spec = &specs[i];
        let input = &planned[i].input;
        if let Fate::Unknown { applied: false } = spec.fate {
            continue;
        }
        let truth = model.truth(&state, input, spec.input);
        let mut next = Vec::new();
        model.step(&state, input, Some(&truth), &mut next);
        // "maybe": the server applied it when it could (the last successor).
        if let Some(s) = next.pop() {
            state = s;
        }
        outputs[i] = match spec.fate {
            Fate::True => Some(truth),
            Fate::Corrupt(c) => Some(model.corrupt(input, c)),
            Fate::Unknown { .. } => None,
        };
    }
    let mut builder = HistoryBuilder::new();
    for (p, output) in planned.into_iter().zip(outputs) {
        let id = builder.invoke(p.client, p.input, p.invoked);
        if let Some(output) = output {
            builder.complete(id, output, p.returned).unwrap();
        }
    }
    builder.build()
}

/// Tries every order of the operations consistent with real time; unknown-outcome operations
/// may also be left out.
fn brute_force<M: Model>(model: &M, history: &History<M::Input, M::Output>) -> bool {
    fn search<M: Model>(
        model: &M,
        ops: &[&Operation<M::Input, M::Output>],
        placed: u32,
        state: &M::State,
    ) -> bool {
        let known_left =
            (0..ops.len()).any(|i| placed & (1 << i) == 0 && ops[i].returned_at().is_some());
        if !known_left {
            return true;
        }
        for i in 0..ops.len() {
            if placed & (1 << i) != 0 {
                continue;
            }
            let must_wait = (0..ops.len()).any(|j| {
                j != i
                    && placed & (1 << j) == 0
                    && ops[j].returned_at().is_some_and(|r| r < ops[i].invoked_at)
            });
            if must_wait {
                continue;
            }
            let mut next = Vec::new();
            model.step(state, &ops[i].input, ops[i].output(), &mut next);
            if next
                .iter()
                .any(|s| search(model, ops, placed | (1 << i), s))
            {
                return true;
            }
        }
        false
    }
    let ops: Vec<_> = history.ops().iter().collect();
    search(model, &ops, 0, &model.init())
}

fn agree<M: Generate>(model: &M, specs: &[Spec]) -> Result<(), TestCaseError>
where
    M::Input: std::fmt::Debug,
{
    let history = build(model, specs);
    let expected = brute_force(model, &history);
    for partition_by_key in [true, false] {
        let verdict = check_with_options(
            model,
            &history,
            &CheckOptions {
                budget: Budget::unlimited(),
                partition_by_key,
            },
        );
        prop_assert!(
            !matches!(verdict, Verdict::Unknown(_)),
            "no budget, yet unknown: {verdict:?}"
        );
        prop_assert_eq!(
            verdict.is_linearizable(),
            expected,
            "partition_by_key = {}, history = {:#?}, verdict = {:?}",
            partition_by_key,
            history.ops(),
            verdict
        );
        if let Verdict::NotLinearizable(explanation) = &verdict {
            prop_assert!(explanation.involved.contains(&explanation.blocked));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn register_agrees_with_brute_force(specs in prop::collection::vec(spec(), 0..=7)) {
        agree(&Register, &specs)?;
    }

    #[test]
    fn versioned_kv_agrees_with_brute_force(specs in prop::collection::vec(spec(), 0..=7)) {
        agree(&VersionedKv, &specs)?;
    }

    #[test]
    fn append_kv_agrees_with_brute_force(specs in prop::collection::vec(spec(), 0..=7)) {
        agree(&AppendKv, &specs)?;
    }
}

/// The generator must produce both verdicts often, or the property tests prove little.
#[test]
fn generated_histories_have_both_verdicts() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(spec(), 1..=7);
    let (mut yes, mut no) = (0, 0);
    for _ in 0..300 {
        let specs = strategy.new_tree(&mut runner).unwrap().current();
        if brute_force(&VersionedKv, &build(&VersionedKv, &specs)) {
            yes += 1;
        } else {
            no += 1;
        }
    }
    assert!(yes > 50 && no > 50, "linearizable {yes}, not {no}");
}
