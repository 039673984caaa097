pub mod dovecot;
pub mod pop3;
