"""One error base and the closed set of reason codes shared by the CLI, logs and docs."""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why a file is (un)trusted. The values are a public contract: never rename one."""

    OK = "ok"
    NO_SIGNATURE = "no-signature"
    BAD_SIGNATURE = "bad-signature"
    UNTRUSTED_KEY = "untrusted-key"
    UNTRUSTED_ROOT = "untrusted-root"
    IDENTITY_MISMATCH = "identity-mismatch"
    DIGEST_MISMATCH = "digest-mismatch"
    MALFORMED_SIGNATURE = "malformed-signature"
    CERTIFICATE_INVALID = "certificate-invalid"
    TLOG_INVALID = "tlog-invalid"
    UNSUPPORTED_SIGNATURE = "unsupported-signature"
    NO_TRUST_CONFIGURED = "no-trust-configured"
    POLICY_DENY = "policy-deny"  # a deny rule matched
    NO_RULE = "no-rule"  # no rule matched and the policy's fallthrough is deny
    GO_PREDICATE = "go-predicate"  # trusted signature, but a Go build requirement failed
    VERIFY_FAILED = "verify-failed"  # verification could not run (I/O error, verifier bug)
    UNVERIFIED = "unverified"  # enforce mode denied a binary before it could be verified
    DECISION_TIMEOUT = "decision-timeout"  # no decision within the deadline: on_timeout applied
    # the exec boundary beyond execve (docs/threat-model.md)
    LOADER_EXEC = "loader-exec"  # a dynamic loader run as a program (ld.so ./prog)
    NO_PATH = "no-path"  # an exec or mapping of a file with no name (memfd, O_TMPFILE, deleted)
    MOUNT_INTO_SCOPE = "mount-into-scope"  # a mount onto a path in scope, refused
    PTRACE_INTO_SCOPE = "ptrace-into-scope"  # a ptrace attach to a program in scope, refused
    TAMPER = "tamper"  # an attempt on the agent, its BPF objects or its files, refused
    OPEN_FOR_WRITE = "open-for-write"  # mapped executable while open for write: bytes may change


class ExecguardError(Exception):
    """Base of every error execguard raises on purpose."""

    def diagnostics(self) -> str:
        return str(self)


class InputError(ExecguardError):
    """A file the operator named cannot be read or is not what it claims (exit code 2)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class MalformedInput(InputError):
    """A file was read but its content is malformed (key, signature, bundle, ELF, policy…)."""


class NotGoBinary(ExecguardError):
    """The file has no Go build info (not Go, or Go with its build info removed)."""
