pub mod activate;
pub mod dovecot;
pub mod pop3;
