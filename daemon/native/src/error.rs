//! Error codes of SPEC §6 and the error every intake check returns.

use std::fmt;

/// SPEC §6 error codes (the numbers are the wire's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    BadFrame = 1,
    Version = 2,
    BadMessage = 3,
    UnknownModel = 4,
    BadInput = 5,
    TooLarge = 6,
    Resource = 7,
    Permission = 8,
    ModelFailed = 9,
    BadRecord = 10,
    BadRequest = 11,
    Deadline = 12,
    Overloaded = 13,
    ShuttingDown = 14,
    Unsupported = 15,
    Internal = 16,
}

impl Code {
    /// The wire name (`BAD_INPUT`, ...), as response descriptors carry it.
    pub fn name(self) -> &'static str {
        match self {
            Code::BadFrame => "BAD_FRAME",
            Code::Version => "VERSION",
            Code::BadMessage => "BAD_MESSAGE",
            Code::UnknownModel => "UNKNOWN_MODEL",
            Code::BadInput => "BAD_INPUT",
            Code::TooLarge => "TOO_LARGE",
            Code::Resource => "RESOURCE",
            Code::Permission => "PERMISSION",
            Code::ModelFailed => "MODEL_FAILED",
            Code::BadRecord => "BAD_RECORD",
            Code::BadRequest => "BAD_REQUEST",
            Code::Deadline => "DEADLINE",
            Code::Overloaded => "OVERLOADED",
            Code::ShuttingDown => "SHUTTING_DOWN",
            Code::Unsupported => "UNSUPPORTED",
            Code::Internal => "INTERNAL",
        }
    }
}

/// A request refused before it ran: its error response carries `code` and `message`, and
/// from protocol 5 what it is about (SPEC §6 "Error fields").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    pub code: Code,
    /// For people: what was wrong and what to do, in the client's terms.
    pub message: String,
    /// The input the error is about, when it is about one.
    pub input: Option<String>,
    /// The limit the request went past, when it went past one.
    pub limit: Option<u64>,
}

impl RequestError {
    pub fn new(code: Code, message: impl Into<String>) -> RequestError {
        RequestError { code, message: message.into(), input: None, limit: None }
    }

    /// The same error, naming the input it is about.
    pub fn about(mut self, input: &str) -> RequestError {
        self.input = Some(input.to_string());
        self
    }

    /// The same error, naming the limit the request went past.
    pub fn past(mut self, limit: u64) -> RequestError {
        self.limit = Some(limit);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> RequestError {
        RequestError::new(Code::BadRequest, message)
    }

    pub fn bad_input(message: impl Into<String>) -> RequestError {
        RequestError::new(Code::BadInput, message)
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

impl std::error::Error for RequestError {}
