/** @odoo-module **/

import { registry } from "@web/core/registry";

import { loginAndOpenQuotation, openPaymentForm, payWith } from "./tour_steps";

// This tour relies on the data of muchiri_mpesa/tests/test_instalments.py (TestInstalmentTour): one
// sent quotation of KES 600,000 of the portal user "distributor", payable with M-Pesa, whose
// prompts ask at most KES 250,000, and a Daraja simulator that answers after a few seconds.

registry.category("web_tour.tours").add("muchiri_mpesa_portal_instalment", {
    url: "/web/login",
    steps: () => [
        ...loginAndOpenQuotation(),
        {
            content: "Before Pay, the form says the amount is asked in 3 prompts of at most 250,000",
            trigger:
                "#modalaccept .o_mpesa_instalments_note:contains(600,000.00)" +
                ":contains(will be asked in 3 prompts of at most 250,000.00)" +
                ":contains(approve each one as it comes)",
        },
        ...payWith("0708374149"),
        {
            content: "Back on the quotation: the instalment is received",
            trigger:
                "#quote_content div[name='o_payment_status_alert']" +
                ":contains(Your M-Pesa payment has been received)",
            timeout: 30000,
        },
        {
            content: "What is paid and what is left",
            trigger:
                "#quote_content div[name='o_mpesa_instalments']" +
                ":contains(250,000.00):contains(still to pay):contains(350,000.00)",
        },
        {
            content: "The order is still a quotation",
            trigger: "#quote_content h2:contains(Quotation)",
        },
        {
            content: "The button for the next prompt",
            trigger: "#quote_content a.o_mpesa_next_prompt:contains(250,000.00)",
            run: "click",
        },
        ...openPaymentForm(),
        {
            content: "The form offers the rest, in 2 prompts",
            trigger:
                "#modalaccept .o_mpesa_instalments_note:contains(350,000.00)" +
                ":contains(will be asked in 2 prompts of at most 250,000.00)",
        },
    ],
});
