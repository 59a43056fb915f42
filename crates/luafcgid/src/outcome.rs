//! Request outcomes (design section 4): what happened to a request, the status it answers
//! with, and the name the audit log gives it. Limits are matched by type, never by text.

use luafcgid_sandbox::{Failure, LimitKind};

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    ScriptError,
    LimitCpu,
    LimitTime,
    LimitMemory,
    LimitOutput,
    BodyTooLarge,
    RateLimited,
    Shed,
    BadRequest,
    NotFound,
    Forbidden,
    PolicyError,
    Aborted,
}

impl Outcome {
    /// The audit log's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ScriptError => "script_error",
            Outcome::LimitCpu => "limit_cpu",
            Outcome::LimitTime => "limit_time",
            Outcome::LimitMemory => "limit_memory",
            Outcome::LimitOutput => "limit_output",
            Outcome::BodyTooLarge => "body_too_large",
            Outcome::RateLimited => "rate_limited",
            Outcome::Shed => "shed",
            Outcome::BadRequest => "bad_request",
            Outcome::NotFound => "not_found",
            Outcome::Forbidden => "forbidden",
            Outcome::PolicyError => "policy_error",
            Outcome::Aborted => "aborted",
        }
    }

    /// The status an error outcome answers with (`Ok` answers what the script set).
    pub fn status(self) -> u16 {
        match self {
            Outcome::Ok => 200,
            Outcome::ScriptError
            | Outcome::LimitCpu
            | Outcome::LimitTime
            | Outcome::LimitMemory
            | Outcome::LimitOutput
            | Outcome::PolicyError => 500,
            Outcome::BodyTooLarge => 413,
            Outcome::RateLimited => 429,
            Outcome::Shed => 503,
            Outcome::BadRequest => 400,
            Outcome::NotFound => 404,
            Outcome::Forbidden => 403,
            Outcome::Aborted => 499,
        }
    }

    /// The outcome of a sandbox failure. A script file that could not be read when its
    /// state was made (deleted or made unreadable after it was resolved, or the daemon out
    /// of descriptors) answers as its resolution would have: 404, 403, or 503.
    pub fn of_failure(f: &Failure) -> Outcome {
        match f {
            Failure::Script { .. } => Outcome::ScriptError,
            Failure::Io(e) => match e.kind() {
                std::io::ErrorKind::NotFound => Outcome::NotFound,
                std::io::ErrorKind::PermissionDenied => Outcome::Forbidden,
                std::io::ErrorKind::OutOfMemory => Outcome::Shed,
                _ if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                ) =>
                {
                    Outcome::Shed
                }
                _ => Outcome::ScriptError,
            },
            Failure::Limit { kind, .. } => match kind {
                LimitKind::Instructions => Outcome::LimitCpu,
                LimitKind::Time => Outcome::LimitTime,
                LimitKind::Memory => Outcome::LimitMemory,
                LimitKind::Output => Outcome::LimitOutput,
            },
            Failure::Aborted => Outcome::Aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_file_gone_or_unreadable_at_load_answers_as_its_resolution_would() {
        let io = |e: std::io::Error| Outcome::of_failure(&Failure::Io(e));
        assert_eq!(io(std::io::ErrorKind::NotFound.into()), Outcome::NotFound);
        assert_eq!(
            io(std::io::ErrorKind::PermissionDenied.into()),
            Outcome::Forbidden
        );
        assert_eq!(
            io(std::io::Error::from_raw_os_error(libc::EMFILE)),
            Outcome::Shed
        );
        assert_eq!(
            io(std::io::Error::from_raw_os_error(libc::EIO)),
            Outcome::ScriptError
        );
        let script = Failure::Script {
            message: "boom".into(),
        };
        assert_eq!(Outcome::of_failure(&script), Outcome::ScriptError);
    }
}
