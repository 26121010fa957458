/** @odoo-module **/

import { registry } from "@web/core/registry";

// This tour relies on the data of muchiri_mpesa/tests/test_instalments.py (TestInstalmentTour): one
// sent quotation of KES 600,000 of the portal user "distributor", payable with M-Pesa, whose
// prompts ask at most KES 250,000, and a Daraja simulator that answers after a few seconds.

// The order's page is done loading once its chatter shows (see portal_payment_tour.js).
function pageLoaded(content) {
    return {
        content,
        trigger: "#chatterRoot:shadow .o-mail-Thread",
        timeout: 30000,
    };
}

function openPaymentForm() {
    return [
        pageLoaded("The quotation is fully loaded, its chatter included"),
        {
            content: "Pay the quotation",
            trigger: "#o_sale_portal_paynow",
            run: "click",
        },
        {
            content: "Choose M-Pesa",
            trigger: "#modalaccept input[name='o_payment_radio'][data-provider-code='mpesa']",
            run: "click",
        },
    ];
}

registry.category("web_tour.tours").add("muchiri_mpesa_portal_instalment", {
    url: "/web/login",
    steps: () => [
        {
            content: "Enter the distributor's login",
            trigger: ".oe_login_form input[name='login']",
            run: "edit distributor",
        },
        {
            content: "Enter the distributor's password",
            trigger: ".oe_login_form input[name='password']",
            run: "edit distributor",
        },
        {
            content: "Log in",
            trigger: ".oe_login_form button[type='submit']",
            run: "click",
        },
        {
            content: "Open the quotations from the portal home",
            trigger: "a[href='/my/quotes']",
            run: "click",
        },
        {
            content: "Open the quotation",
            trigger: ".o_portal_my_doc_table a[href^='/my/orders/']",
            run: "click",
        },
        ...openPaymentForm(),
        {
            content: "Before Pay, the form says the amount is asked in 3 prompts of at most 250,000",
            trigger:
                "#modalaccept .o_mpesa_instalments_note:contains(600,000.00)" +
                ":contains(will be asked in 3 prompts of at most 250,000.00)" +
                ":contains(approve each on your phone)",
        },
        {
            content: "Enter the M-Pesa phone number",
            trigger: "#modalaccept #o_mpesa_phone",
            run: "edit 0708374149",
        },
        {
            content: "Pay the first instalment",
            trigger: "#modalaccept button[name='o_payment_submit_button']:enabled",
            run: "click",
        },
        {
            content: "The status page tells to complete the payment on the phone",
            trigger:
                "div[name='o_payment_status'] div[name='o_payment_status_alert']" +
                ":contains(We sent an M-Pesa prompt to your phone)",
        },
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
