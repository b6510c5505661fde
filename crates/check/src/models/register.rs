//! A single register with read, write and compare-and-set (the Jepsen etcd tests' model).

use crate::model::Model;

/// A single register holding a string, absent (`None`) at first.
///
/// Reads return the value; writes always succeed; `cas(from, to)` sets `to` only when the value
/// equals `from`, and its answer says whether it did. The register has no keys: one history is
/// one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Register;

/// An operation on a [`Register`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RegisterInput {
    /// Read the value.
    Read,
    /// Set the value.
    Write(String),
    /// Set `to` if the value is `from`.
    Cas {
        /// The value expected.
        from: String,
        /// The value to set.
        to: String,
    },
}

/// An answer of a [`Register`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RegisterOutput {
    /// A read's answer; `None` when the register is absent.
    Value(Option<String>),
    /// A write applied, or a cas found `from` and applied.
    Ok,
    /// A cas found another value and did nothing; a failed write or read did nothing.
    Failed,
}

impl Model for Register {
    type Input = RegisterInput;
    type Output = RegisterOutput;
    type State = Option<String>;

    fn init(&self) -> Self::State {
        None
    }

    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
        next: &mut Vec<Self::State>,
    ) {
        use RegisterOutput as Out;
        match (input, output) {
            (RegisterInput::Read, None | Some(Out::Failed)) => next.push(state.clone()),
            (RegisterInput::Read, Some(Out::Value(value))) => {
                if value == state {
                    next.push(state.clone());
                }
            }
            (RegisterInput::Write(value), None | Some(Out::Ok)) => next.push(Some(value.clone())),
            (RegisterInput::Write(_), Some(Out::Failed)) => next.push(state.clone()),
            (RegisterInput::Cas { from, to }, output) => {
                let matches = state.as_deref() == Some(from.as_str());
                match output {
                    None if matches => next.push(Some(to.clone())),
                    None => next.push(state.clone()),
                    Some(Out::Ok) if matches => next.push(Some(to.clone())),
                    Some(Out::Failed) if !matches => next.push(state.clone()),
                    Some(_) => {}
                }
            }
            (RegisterInput::Read, Some(Out::Ok))
            | (RegisterInput::Write(_), Some(Out::Value(_))) => {}
        }
    }

    fn is_read_only(&self, input: &Self::Input, output: Option<&Self::Output>) -> bool {
        matches!(input, RegisterInput::Read) || matches!(output, Some(RegisterOutput::Failed))
    }

    fn describe_op(&self, input: &Self::Input, output: Option<&Self::Output>) -> String {
        let input = match input {
            RegisterInput::Read => "read".to_string(),
            RegisterInput::Write(value) => format!("write {value}"),
            RegisterInput::Cas { from, to } => format!("cas {from}->{to}"),
        };
        let output = match output {
            None => "?".to_string(),
            Some(RegisterOutput::Value(Some(value))) => value.clone(),
            Some(RegisterOutput::Value(None)) => "nil".to_string(),
            Some(RegisterOutput::Ok) => "ok".to_string(),
            Some(RegisterOutput::Failed) => "fail".to_string(),
        };
        format!("{input} -> {output}")
    }

    fn describe_state(&self, state: &Self::State) -> String {
        match state {
            Some(value) => value.clone(),
            None => "nil".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(
        state: Option<&str>,
        input: RegisterInput,
        output: Option<RegisterOutput>,
    ) -> Vec<Option<String>> {
        let mut next = Vec::new();
        Register.step(
            &state.map(str::to_string),
            &input,
            output.as_ref(),
            &mut next,
        );
        next
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn read_must_return_the_value() {
        assert_eq!(
            step(None, RegisterInput::Read, Some(RegisterOutput::Value(None))),
            vec![None]
        );
        assert!(step(
            None,
            RegisterInput::Read,
            Some(RegisterOutput::Value(s("1")))
        )
        .is_empty());
        assert_eq!(
            step(
                Some("1"),
                RegisterInput::Read,
                Some(RegisterOutput::Value(s("1")))
            ),
            vec![s("1")]
        );
        assert_eq!(step(Some("1"), RegisterInput::Read, None), vec![s("1")]);
    }

    #[test]
    fn write_sets_the_value() {
        assert_eq!(
            step(
                None,
                RegisterInput::Write("2".into()),
                Some(RegisterOutput::Ok)
            ),
            vec![s("2")]
        );
        assert_eq!(
            step(Some("1"), RegisterInput::Write("2".into()), None),
            vec![s("2")]
        );
        assert_eq!(
            step(
                Some("1"),
                RegisterInput::Write("2".into()),
                Some(RegisterOutput::Failed)
            ),
            vec![s("1")]
        );
    }

    #[test]
    fn cas_applies_only_on_a_match_and_says_so() {
        let cas = || RegisterInput::Cas {
            from: "1".into(),
            to: "2".into(),
        };
        assert_eq!(
            step(Some("1"), cas(), Some(RegisterOutput::Ok)),
            vec![s("2")]
        );
        assert!(step(Some("3"), cas(), Some(RegisterOutput::Ok)).is_empty());
        assert!(step(None, cas(), Some(RegisterOutput::Ok)).is_empty());
        assert_eq!(
            step(Some("3"), cas(), Some(RegisterOutput::Failed)),
            vec![s("3")]
        );
        assert!(step(Some("1"), cas(), Some(RegisterOutput::Failed)).is_empty());
        assert_eq!(step(Some("1"), cas(), None), vec![s("2")]);
        assert_eq!(step(Some("3"), cas(), None), vec![s("3")]);
    }

    #[test]
    fn answers_of_the_wrong_kind_are_impossible() {
        assert!(step(None, RegisterInput::Read, Some(RegisterOutput::Ok)).is_empty());
        assert!(step(
            None,
            RegisterInput::Write("1".into()),
            Some(RegisterOutput::Value(None))
        )
        .is_empty());
    }
}
